//! Which ranks run where, with the `deepspeed` launcher's semantics: a resource pool from
//! `--hostfile` (`host slots=N`) or the local GPUs, narrowed by `--num_gpus`, `--include` or
//! `--exclude` (`NAME[:SLOT[,SLOT…]][@NAME…]`); global ranks go host by host in pool order.
//!
//! Device numbering follows the launcher too: a slot is a physical GPU id; every worker of a host
//! is started with `CUDA_VISIBLE_DEVICES` set to that host's selected GPUs, and opens `cuda:I`
//! where I is its device's position in that list (its local index).

use crate::error::{CoordinatorError, Result};
use kormlm_proto::v1::{self, DeviceKind};
use std::path::Path;

/// One rank's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub rank: u32,
    pub local_rank: u32,
    pub host: String,
    /// CUDA device ids on that host (empty for CPU ranks).
    pub cuda_devices: Vec<u32>,
}

impl From<&v1::Placement> for Placement {
    fn from(p: &v1::Placement) -> Self {
        Self {
            rank: p.rank,
            local_rank: p.local_rank,
            host: p.host.clone(),
            cuda_devices: p.cuda_devices.clone(),
        }
    }
}

impl Placement {
    /// As a job spec carries it.
    pub fn to_proto(&self) -> v1::Placement {
        v1::Placement {
            rank: self.rank,
            local_rank: self.local_rank,
            host: self.host.clone(),
            cuda_devices: self.cuda_devices.clone(),
        }
    }
}

fn flag(name: &str, message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Flag {
        flag: name.into(),
        message: message.into(),
    }
}

/// `host slots=N` lines; `#` starts a comment.
pub fn parse_hostfile(path: &Path) -> Result<Vec<(String, u32)>> {
    let text = std::fs::read_to_string(path).map_err(|e| flag("--hostfile", format!("{}: {e}", path.display())))?;
    let mut hosts: Vec<(String, u32)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            flag(
                "--hostfile",
                format!(
                    "{} line {}: expected `HOST slots=N`, got {raw:?}",
                    path.display(),
                    i + 1
                ),
            )
        };
        let mut parts = line.split_whitespace();
        let host = parts.next().ok_or_else(bad)?;
        let slots = parts
            .next()
            .and_then(|p| p.strip_prefix("slots="))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        if hosts.iter().any(|(h, _)| h == host) {
            return Err(flag(
                "--hostfile",
                format!("{} line {}: host {host} is listed twice", path.display(), i + 1),
            ));
        }
        hosts.push((host.to_string(), slots));
    }
    if hosts.is_empty() {
        return Err(flag("--hostfile", format!("{} lists no host", path.display())));
    }
    Ok(hosts)
}

/// `worker-0@worker-1:0,2` → [(worker-0, None), (worker-1, Some([0, 2]))].
pub fn parse_node_spec(name: &str, spec: &str) -> Result<Vec<(String, Option<Vec<u32>>)>> {
    let mut out: Vec<(String, Option<Vec<u32>>)> = Vec::new();
    for node in spec.split('@').filter(|n| !n.is_empty()) {
        let host = node.split_once(':').map_or(node, |(host, _)| host);
        if out.iter().any(|(h, _)| h == host) {
            return Err(flag(
                name,
                format!("{spec:?} names host {host} twice; list its slots once, e.g. {host}:0,1"),
            ));
        }
        match node.split_once(':') {
            None => out.push((node.to_string(), None)),
            Some((host, slots)) => {
                let ids = slots
                    .split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| flag(name, format!("{node:?}: slots must be integers like localhost:0,2")))?;
                if let Some(twice) = ids.iter().enumerate().find(|(i, id)| ids[..*i].contains(id)) {
                    return Err(flag(
                        name,
                        format!(
                            "{node:?} lists slot {} twice; each GPU takes one rank (NCCL refuses two ranks \
                             on one GPU: \"Duplicate GPU detected\")",
                            twice.1
                        ),
                    ));
                }
                out.push((host.to_string(), Some(ids)));
            }
        }
    }
    if out.is_empty() {
        return Err(flag(
            name,
            "empty; expected NAME[:SLOT[,SLOT…]][@NAME…], e.g. localhost:0,2",
        ));
    }
    Ok(out)
}

/// `CUDA_VISIBLE_DEVICES` as the `deepspeed` launcher reads it on a single host: the physical ids
/// of the GPUs the job may use (unset: all of them). `count` is the number of GPUs the host has.
/// Only integer ids are accepted (not GPU UUIDs or MIG names, whose slots could not be named).
pub fn visible_devices(value: Option<&str>, count: u32) -> Result<Option<Vec<u32>>> {
    let Some(value) = value else { return Ok(None) };
    let name = "CUDA_VISIBLE_DEVICES";
    let ids = value
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                flag(
                    name,
                    format!("{value:?}: entry {s:?} is not a GPU index; give indices like 2,3"),
                )
            })
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        return Err(flag(name, format!("{value:?} hides every GPU of this host")));
    }
    if let Some(id) = ids.iter().find(|id| **id >= count) {
        return Err(flag(
            name,
            format!("{value:?} names GPU {id}, but this host has {count} (0..{count})"),
        ));
    }
    if let Some(twice) = ids.iter().enumerate().find(|(i, id)| ids[..*i].contains(id)) {
        return Err(flag(name, format!("{value:?} lists GPU {} twice", twice.1)));
    }
    Ok(Some(ids))
}

/// The GPUs the workers of `host` see (`CUDA_VISIBLE_DEVICES` the launcher gives them): the
/// devices of that host's placements in local-rank order.
pub fn host_visible_devices(placements: &[Placement], host: &str) -> Vec<u32> {
    let mut on_host: Vec<&Placement> = placements.iter().filter(|p| p.host == host).collect();
    on_host.sort_by_key(|p| p.local_rank);
    on_host.iter().flat_map(|p| p.cuda_devices.iter().copied()).collect()
}

/// `2,3`: a device list as `CUDA_VISIBLE_DEVICES` spells it.
pub fn device_list(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Selection flags of the launcher.
#[derive(Debug, Default, Clone)]
pub struct Selection<'a> {
    pub num_gpus: Option<u32>,
    pub include: Option<&'a str>,
    pub exclude: Option<&'a str>,
}

/// The placements for a pool of `(host, gpu ids)`.
pub fn plan(pool: Vec<(String, Vec<u32>)>, selection: &Selection<'_>) -> Result<Vec<Placement>> {
    if selection.include.is_some() && selection.exclude.is_some() {
        return Err(flag("--include", "cannot be combined with --exclude"));
    }
    if selection.num_gpus.is_some() && (selection.include.is_some() || selection.exclude.is_some()) {
        return Err(flag("--num_gpus", "cannot be combined with --include/--exclude"));
    }
    let mut pool = pool;
    if let Some(n) = selection.num_gpus {
        for (_, ids) in &mut pool {
            ids.truncate(n as usize);
        }
    }
    if let Some(spec) = selection.include {
        let wanted = parse_node_spec("--include", spec)?;
        let mut narrowed = Vec::new();
        for (host, slots) in wanted {
            let available = pool
                .iter()
                .find(|(h, _)| *h == host)
                .map(|(_, ids)| ids.clone())
                .ok_or_else(|| flag("--include", format!("host {host} is not in the resource pool")))?;
            let ids = match slots {
                None => available,
                Some(ids) => {
                    if let Some(missing) = ids.iter().find(|i| !available.contains(i)) {
                        return Err(flag(
                            "--include",
                            format!("{host} has no slot {missing} (slots: {available:?})"),
                        ));
                    }
                    ids
                }
            };
            narrowed.push((host, ids));
        }
        pool = narrowed;
    }
    if let Some(spec) = selection.exclude {
        for (host, slots) in parse_node_spec("--exclude", spec)? {
            let entry = pool
                .iter_mut()
                .find(|(h, _)| *h == host)
                .ok_or_else(|| flag("--exclude", format!("host {host} is not in the resource pool")))?;
            match slots {
                None => entry.1.clear(),
                Some(ids) => entry.1.retain(|i| !ids.contains(i)),
            }
        }
    }
    let mut placements = Vec::new();
    for (host, ids) in pool {
        for (local, id) in ids.into_iter().enumerate() {
            placements.push(Placement {
                rank: placements.len() as u32,
                local_rank: local as u32,
                host: host.clone(),
                cuda_devices: vec![id],
            });
        }
    }
    if placements.is_empty() {
        return Err(flag("--include", "the selection leaves no GPU to run on"));
    }
    Ok(placements)
}

/// `n` CPU ranks on this host.
pub fn cpu_plan(n: u32) -> Vec<Placement> {
    (0..n)
        .map(|rank| Placement {
            rank,
            local_rank: rank,
            host: "localhost".into(),
            cuda_devices: vec![],
        })
        .collect()
}

/// The placements of the ranks in `keep` (old rank numbers), renumbered 0..M-1 in rank order,
/// with local ranks renumbered per host: what an elastic continuation on the surviving ranks
/// launches. Each survivor keeps its host and devices.
pub fn renumbered(placements: &[Placement], keep: &[u32]) -> Vec<Placement> {
    let mut kept: Vec<&Placement> = placements.iter().filter(|p| keep.contains(&p.rank)).collect();
    kept.sort_by_key(|p| p.rank);
    let mut per_host: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    kept.iter()
        .enumerate()
        .map(|(rank, p)| {
            let local = per_host.entry(p.host.as_str()).or_insert(0);
            let placement = Placement {
                rank: rank as u32,
                local_rank: *local,
                host: p.host.clone(),
                cuda_devices: p.cuda_devices.clone(),
            };
            *local += 1;
            placement
        })
        .collect()
}

/// The devices one rank runs on, as the assignment and the status name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankDevices {
    /// `cuda:N` (`cuda:N (GPU P)` when the physical id differs) or `cpu`.
    pub names: Vec<String>,
    /// The CUDA ordinals the worker opens, indices into the devices it sees (empty on CPU).
    pub cuda: Vec<u32>,
    /// The physical GPU ids behind them (the same numbers when the worker's visibility is not
    /// narrowed by the launcher).
    pub physical: Vec<u32>,
}

/// The one device mapping: a placed CUDA rank gets the GPUs of its placement, which its worker
/// sees at local indices `local_rank * n ..` of its host's `CUDA_VISIBLE_DEVICES` (see
/// [`host_visible_devices`]); an external worker gets the GPU of its local rank among the
/// devices it sees; a CPU rank gets `cpu`.
pub fn rank_devices(device: DeviceKind, placement: Option<&Placement>, local_rank: u32) -> RankDevices {
    let (cuda, physical): (Vec<u32>, Vec<u32>) = match (device, placement) {
        (DeviceKind::Cuda, Some(p)) if !p.cuda_devices.is_empty() => {
            let n = p.cuda_devices.len() as u32;
            ((0..n).map(|i| local_rank * n + i).collect(), p.cuda_devices.clone())
        }
        // Which physical GPU an unplaced worker's index means is up to its own environment.
        (DeviceKind::Cuda, _) => (vec![local_rank], vec![]),
        _ => {
            return RankDevices {
                names: vec!["cpu".to_string()],
                cuda: vec![],
                physical: vec![],
            }
        }
    };
    RankDevices {
        names: cuda
            .iter()
            .enumerate()
            .map(|(i, local)| match physical.get(i) {
                Some(gpu) if gpu != local => format!("cuda:{local} (GPU {gpu})"),
                _ => format!("cuda:{local}"),
            })
            .collect(),
        cuda,
        physical,
    }
}

fn this_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Whether `host` names this machine.
pub fn is_local(host: &str) -> bool {
    host == "localhost" || host == "127.0.0.1" || host == this_host()
}

/// The URL other hosts reach the coordinator on: a wildcard listen address (`0.0.0.0`, `[::]`)
/// is replaced by this machine's host name.
pub fn advertised_url(listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("http://{}:{}", this_host(), listen.port())
    } else {
        format!("http://{listen}")
    }
}

/// The command that starts a rank on its host (the token travels in `KORMLM_TOKEN`, never on
/// a command line), with the host's `CUDA_VISIBLE_DEVICES` when it has selected GPUs.
pub fn remote_worker_command(rank: u32, local_rank: u32, coordinator_url: &str, visible: &[u32]) -> String {
    let env = match visible.is_empty() {
        true => String::new(),
        false => format!("CUDA_VISIBLE_DEVICES={} ", device_list(visible)),
    };
    format!("{env}worker --rank {rank} --local_rank {local_rank} --coordinator {coordinator_url}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survivors_are_renumbered_and_keep_their_devices() {
        let gpu = |rank, local_rank, host: &str, device| Placement {
            rank,
            local_rank,
            host: host.into(),
            cuda_devices: vec![device],
        };
        let plan = vec![
            gpu(0, 0, "a", 0),
            gpu(1, 1, "a", 1),
            gpu(2, 0, "b", 4),
            gpu(3, 1, "b", 5),
        ];
        assert_eq!(
            renumbered(&plan, &[0, 2, 3]),
            vec![gpu(0, 0, "a", 0), gpu(1, 0, "b", 4), gpu(2, 1, "b", 5)]
        );
        assert_eq!(renumbered(&cpu_plan(3), &[0, 2]), cpu_plan(2));
    }

    #[test]
    fn other_hosts_get_a_reachable_url() {
        let wildcard: std::net::SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert_eq!(advertised_url(wildcard), format!("http://{}:50051", this_host()));
        let ip: std::net::SocketAddr = "10.1.2.3:7000".parse().unwrap();
        assert_eq!(advertised_url(ip), "http://10.1.2.3:7000");
    }

    #[test]
    fn devices_follow_the_placement_and_the_device_kind() {
        let gpu = Placement {
            rank: 3,
            local_rank: 1,
            host: "h".into(),
            cuda_devices: vec![2, 3],
        };
        let d = rank_devices(DeviceKind::Cuda, Some(&gpu), 1);
        assert_eq!(
            (d.names, d.cuda, d.physical),
            (vec!["cuda:2".to_string(), "cuda:3".to_string()], vec![2, 3], vec![2, 3])
        );
        let one = Placement {
            cuda_devices: vec![5],
            ..gpu.clone()
        };
        let d = rank_devices(DeviceKind::Cuda, Some(&one), 1);
        assert_eq!(
            (d.names, d.cuda, d.physical),
            (vec!["cuda:1 (GPU 5)".to_string()], vec![1], vec![5])
        );
        let d = rank_devices(DeviceKind::Cuda, None, 1);
        assert_eq!(
            (d.names, d.cuda, d.physical),
            (vec!["cuda:1".to_string()], vec![1], vec![])
        );
        let d = rank_devices(DeviceKind::Cpu, Some(&gpu), 1);
        assert_eq!((d.names, d.cuda), (vec!["cpu".to_string()], vec![]));
    }

    fn pool() -> Vec<(String, Vec<u32>)> {
        vec![
            ("worker-0".into(), vec![0, 1, 2, 3]),
            ("worker-1".into(), vec![0, 1, 2, 3]),
        ]
    }

    #[test]
    fn ranks_go_host_by_host() {
        let p = plan(pool(), &Selection::default()).unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(
            (
                p[5].rank,
                p[5].local_rank,
                p[5].host.as_str(),
                p[5].cuda_devices.clone()
            ),
            (5, 1, "worker-1", vec![1])
        );
    }

    #[test]
    fn num_gpus_include_and_exclude() {
        let p = plan(
            pool(),
            &Selection {
                num_gpus: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            p.iter()
                .map(|x| (x.host.as_str(), x.cuda_devices[0]))
                .collect::<Vec<_>>(),
            vec![("worker-0", 0), ("worker-0", 1), ("worker-1", 0), ("worker-1", 1)]
        );
        let p = plan(
            pool(),
            &Selection {
                include: Some("worker-1:0,2"),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.iter().map(|x| x.cuda_devices[0]).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(p[1].local_rank, 1);
        let p = plan(
            pool(),
            &Selection {
                exclude: Some("worker-0@worker-1:3"),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.iter().map(|x| x.cuda_devices[0]).collect::<Vec<_>>(), vec![0, 1, 2]);
        let err = plan(
            pool(),
            &Selection {
                include: Some("worker-9"),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("worker-9 is not in the resource pool"));
        let err = plan(
            pool(),
            &Selection {
                include: Some("worker-0:7"),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("no slot 7"));
        for (spec, expected) in [
            ("worker-0:0,0", "lists slot 0 twice"),
            ("worker-0:1@worker-0:2", "names host worker-0 twice"),
        ] {
            let err = plan(
                pool(),
                &Selection {
                    include: Some(spec),
                    ..Default::default()
                },
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("--include") && err.contains(expected), "{err}");
        }
        assert!(plan(
            pool(),
            &Selection {
                include: Some("a"),
                exclude: Some("b"),
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn cuda_visible_devices_names_the_pool() {
        assert_eq!(visible_devices(None, 4).unwrap(), None);
        assert_eq!(visible_devices(Some("2,3"), 4).unwrap(), Some(vec![2, 3]));
        for (value, expected) in [
            ("", "hides every GPU"),
            ("GPU-8e6a", "is not a GPU index"),
            ("1,4", "names GPU 4, but this host has 4"),
            ("1,1", "lists GPU 1 twice"),
        ] {
            let err = visible_devices(Some(value), 4).unwrap_err().to_string();
            assert!(err.contains("CUDA_VISIBLE_DEVICES") && err.contains(expected), "{err}");
        }
        let plan = vec![
            Placement {
                rank: 1,
                local_rank: 1,
                host: "a".into(),
                cuda_devices: vec![3],
            },
            Placement {
                rank: 0,
                local_rank: 0,
                host: "a".into(),
                cuda_devices: vec![2],
            },
        ];
        assert_eq!(host_visible_devices(&plan, "a"), vec![2, 3]);
        assert_eq!(
            remote_worker_command(1, 1, "http://c:1", &[2, 3]),
            "CUDA_VISIBLE_DEVICES=2,3 worker --rank 1 --local_rank 1 --coordinator http://c:1"
        );
    }

    #[test]
    fn hostfile_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hostfile");
        std::fs::write(&p, "# cluster\nworker-0 slots=4\n\nworker-1 slots=2  # small\n").unwrap();
        assert_eq!(
            parse_hostfile(&p).unwrap(),
            vec![("worker-0".into(), 4), ("worker-1".into(), 2)]
        );
        std::fs::write(&p, "worker-0 slots=4\nworker-1 gpus=2\n").unwrap();
        let err = parse_hostfile(&p).unwrap_err().to_string();
        assert!(err.contains("line 2: expected `HOST slots=N`"), "{err}");
    }
}
