//! Workers on the other hosts of a `--hostfile`, started by this coordinator through a remote
//! shell, as `deepspeed --launcher` does: `ssh` (`-o BatchMode=yes`: never a password prompt),
//! `pdsh` (`-S -f 1024 -w HOST`, `PDSH_RCMD_TYPE=ssh`) or, inside a Slurm allocation, `srun`
//! (one single-task step on the host, `--overlap` so it shares the allocation's resources). One
//! launcher process per remote rank: it lives as long as the remote worker, so its exit is the
//! worker's exit.
//!
//! The token never travels on a command line or in an environment assignment on one: over ssh
//! and srun it is written to the session's stdin (`worker --token-stdin`; srun forwards stdin to
//! its task); pdsh forwards no stdin, so its workers read the coordinator's 0600
//! `STATE_DIR/token` (`--token-file`), which must lie on a file system the hosts share, like the
//! outputs.
//!
//! The remote shell prints `kormlm-remote-pid PID` before it `exec`s the worker, so the worker
//! keeps that pid; under sshd it leads its own session and process group, which `kill --force`
//! signals through the same launcher (`kill -TERM -- -PID`).

use crate::error::{CoordinatorError, Result};
use clap::ValueEnum;
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// `--launcher`: how workers on other hosts are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LauncherKind {
    /// One `ssh -o BatchMode=yes HOST …` per remote rank; the token on its stdin.
    Ssh,
    /// One `pdsh -S -f 1024 -w HOST …` per remote rank (PDSH_RCMD_TYPE=ssh); the token from
    /// STATE_DIR/token on a shared file system.
    Pdsh,
    /// One `srun --nodes=1 --ntasks=1 --nodelist=HOST --overlap sh -c …` step per remote rank,
    /// inside the allocation (SLURM_JOB_ID set); the token on its stdin.
    Slurm,
    /// Start nothing on other hosts: log the command to run there.
    None,
}

/// The marker the remote shell prints before it becomes the worker.
const PID_MARKER: &str = "kormlm-remote-pid ";

/// How long a remote `kill` may take (connecting included) before it is given up.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(20);

/// Environment variables passed on to remote workers (names, or prefixes ending in `_`), as
/// deepspeed exports `NCCL*`: settings, never secrets.
const EXPORTED: &[&str] = &[
    "NCCL_",
    "HF_",
    "OMP_NUM_THREADS",
    "KORMLM_COLLECTIVE_TIMEOUT_S",
    "KORMLM_CACHE",
    "LIBTORCH",
];

fn flag(name: &str, message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Flag {
        flag: name.into(),
        message: message.into(),
    }
}

/// Which remote shell runs the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Ssh,
    Pdsh,
    Srun,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Ssh => "ssh",
            Via::Pdsh => "pdsh",
            Via::Srun => "srun",
        }
    }
}

/// A remote shell: runs one command line on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteShell {
    pub via: Via,
    pub ssh_port: Option<u16>,
    /// `--launcher_args`, split as a shell would.
    pub extra: Vec<String>,
}

/// What the launcher flags ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteStart {
    /// `--launcher none`: log the commands for the other hosts.
    Print,
    Shell(RemoteShell),
}

/// Whether `program` is an executable file on `PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The launcher from `--launcher`, `--ssh_port` and `--launcher_args` (default: pdsh when it
/// is installed, else ssh, as deepspeed prefers pdsh).
pub fn choose(
    kind: Option<LauncherKind>,
    ssh_port: Option<u16>,
    launcher_args: Option<&str>,
    hostfile: bool,
) -> Result<RemoteStart> {
    let given = [
        (kind.is_some(), "--launcher"),
        (ssh_port.is_some(), "--ssh_port"),
        (launcher_args.is_some(), "--launcher_args"),
    ];
    if !hostfile {
        if let Some((_, name)) = given.iter().find(|(set, _)| *set) {
            return Err(flag(
                name,
                "starts workers on the other hosts of --hostfile; give --hostfile too",
            ));
        }
    }
    let kind = kind.unwrap_or(if on_path("pdsh") {
        LauncherKind::Pdsh
    } else {
        LauncherKind::Ssh
    });
    let via = match kind {
        LauncherKind::Ssh => Via::Ssh,
        LauncherKind::Pdsh => Via::Pdsh,
        LauncherKind::Slurm => {
            if ssh_port.is_some() {
                return Err(flag(
                    "--ssh_port",
                    "has no effect with --launcher slurm (srun starts the workers)",
                ));
            }
            if std::env::var_os("SLURM_JOB_ID").is_none() {
                return Err(flag(
                    "--launcher",
                    "slurm starts the workers with srun inside an allocation, and SLURM_JOB_ID is not set: run \
                     the coordinator under salloc or sbatch (or use scripts/slurm/kormlm.sbatch), or use \
                     --launcher ssh|pdsh",
                ));
            }
            Via::Srun
        }
        LauncherKind::None => {
            if let Some((_, name)) = given[1..].iter().find(|(set, _)| *set) {
                return Err(flag(
                    name,
                    "has no effect with --launcher none (the commands for the other hosts are only logged)",
                ));
            }
            return Ok(RemoteStart::Print);
        }
    };
    let extra = match launcher_args {
        Some(text) => shlex::split(text).ok_or_else(|| {
            flag(
                "--launcher_args",
                format!(
                    "{text:?}: unbalanced quotes; give the arguments as a shell would, e.g. \"-o ConnectTimeout=10\""
                ),
            )
        })?,
        None => Vec::new(),
    };
    Ok(RemoteStart::Shell(RemoteShell { via, ssh_port, extra }))
}

/// `text` as one word of a POSIX shell command line.
pub fn quote(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if safe {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

impl RemoteShell {
    /// The launcher process that runs `script` (one shell command line) on `host`. Neither the
    /// token nor its variable is passed on to it.
    pub fn command(&self, host: &str, script: &str) -> std::process::Command {
        let mut command = std::process::Command::new(self.via.name());
        let port = self.ssh_port.map(|p| p.to_string());
        match self.via {
            Via::Ssh => {
                command.args(["-o", "BatchMode=yes"]);
                if let Some(port) = &port {
                    command.args(["-p", port]);
                }
                command.args(&self.extra).arg(host).arg(script);
            }
            Via::Pdsh => {
                let mut append = std::env::var("PDSH_SSH_ARGS_APPEND").unwrap_or_default();
                append.push_str(" -o BatchMode=yes");
                if let Some(port) = &port {
                    append.push_str(&format!(" -p {port}"));
                }
                command
                    .env("PDSH_RCMD_TYPE", "ssh")
                    .env("PDSH_SSH_ARGS_APPEND", append.trim_start())
                    .args(["-S", "-f", "1024", "-w", host])
                    .args(&self.extra)
                    .arg(script);
            }
            Via::Srun => {
                command
                    .args(["--nodes=1", "--ntasks=1", "--overlap", "--quiet"])
                    .arg(format!("--nodelist={host}"))
                    .args(&self.extra)
                    .args(["sh", "-c", script]);
            }
        }
        command
            .env_remove(kormlm_proto::secret::TOKEN_ENV)
            .env_remove("KORMLM_TOKEN_FILE");
        command
    }

    /// Whether the token reaches the worker on the session's stdin (else through a file).
    pub fn forwards_stdin(&self) -> bool {
        matches!(self.via, Via::Ssh | Via::Srun)
    }
}

/// How a remote worker starts: in `cwd` (paths in the job's flags mean the same there), with
/// `env` assigned, as `worker ARGS…`. Without `OMP_NUM_THREADS` in `env`, the host's cores are
/// shared out among its `slots` workers, as for local ones.
pub fn worker_script(cwd: &Path, env: &[(String, String)], slots: usize, worker: &Path, args: &[String]) -> String {
    let mut script = format!(
        "cd {} || exit 1; echo {PID_MARKER}$$; ",
        quote(&cwd.display().to_string())
    );
    let mut assignments: Vec<String> = env.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect();
    if !env.iter().any(|(k, _)| k == "OMP_NUM_THREADS") {
        script.push_str(&format!(
            "t=$(( $(nproc 2>/dev/null || echo 1) / {} )); [ \"$t\" -ge 1 ] || t=1; ",
            slots.max(1)
        ));
        assignments.push("OMP_NUM_THREADS=$t".into());
    }
    script.push_str("exec env ");
    for a in assignments {
        script.push_str(&a);
        script.push(' ');
    }
    script.push_str(&quote(&worker.display().to_string()));
    for arg in args {
        script.push(' ');
        script.push_str(&quote(arg));
    }
    script
}

/// The settings of this environment passed on to remote workers (see [`EXPORTED`]).
pub fn exported_env() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            EXPORTED
                .iter()
                .any(|e| if e.ends_with('_') { k.starts_with(e) } else { k == e })
        })
        .collect();
    vars.sort();
    vars
}

/// The pid in a `kormlm-remote-pid PID` line (pdsh prefixes `HOST: `).
pub fn remote_pid(line: &str) -> Option<u32> {
    let rest = &line[line.find(PID_MARKER)? + PID_MARKER.len()..];
    rest.trim().parse().ok()
}

/// The command that sends `signal` to the remote worker's process group (to the process when
/// it left its group).
pub fn kill_script(pid: u32, signal: Signal) -> String {
    let name = signal.as_str().trim_start_matches("SIG");
    format!("kill -{name} -- -{pid} 2>/dev/null || kill -{name} {pid}")
}

/// A worker started on another host, as far as this coordinator can reach it.
#[derive(Debug)]
pub struct RemoteProcess {
    pub shell: RemoteShell,
    pub host: String,
    pid: OnceLock<u32>,
}

impl RemoteProcess {
    pub fn new(shell: RemoteShell, host: &str) -> Self {
        Self {
            shell,
            host: host.to_string(),
            pid: OnceLock::new(),
        }
    }

    /// The worker's pid on its host, once its shell has said it.
    pub fn pid(&self) -> Option<u32> {
        self.pid.get().copied()
    }

    pub fn set_pid(&self, pid: u32) {
        let _ = self.pid.set(pid);
    }

    /// Sends `signal` to the worker's process group on its host through the launcher; true
    /// when the remote `kill` succeeded within [`SIGNAL_TIMEOUT`].
    pub async fn signal(&self, pid: u32, signal: Signal) -> bool {
        let script = kill_script(pid, signal);
        let mut command = tokio::process::Command::from(self.shell.command(&self.host, &script));
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let what = format!("{} {} {script}", self.shell.via.name(), self.host);
        let output = match tokio::time::timeout(SIGNAL_TIMEOUT, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                tracing::warn!(host = %self.host, pid, error = %e, "cannot signal the remote worker: {what}");
                return false;
            }
            Err(_) => {
                tracing::warn!(
                    host = %self.host,
                    pid,
                    "signalling the remote worker got no answer within {} s: {what}",
                    SIGNAL_TIMEOUT.as_secs()
                );
                return false;
            }
        };
        if !output.status.success() {
            tracing::warn!(
                host = %self.host,
                pid,
                status = %output.status,
                stderr = %String::from_utf8_lossy(&output.stderr).trim(),
                "signalling the remote worker failed: {what}"
            );
        }
        output.status.success()
    }
}

/// Everything the coordinator needs to start workers on other hosts.
#[derive(Debug, Clone)]
pub struct RemoteLaunch {
    pub shell: RemoteShell,
    /// The URL other hosts reach this coordinator on.
    pub url: String,
    /// STATE_DIR/token, absolute (pdsh's workers read it).
    pub token_file: PathBuf,
    /// The working directory remote workers start in (this one).
    pub cwd: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(command: &std::process::Command) -> Vec<String> {
        std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(|s| s.to_string_lossy().to_string())
            .collect()
    }

    #[test]
    fn ssh_and_pdsh_command_lines() {
        let ssh = RemoteShell {
            via: Via::Ssh,
            ssh_port: Some(2222),
            extra: vec!["-o".into(), "ConnectTimeout=5".into()],
        };
        assert_eq!(
            argv(&ssh.command("node-b", "hostname")),
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-p",
                "2222",
                "-o",
                "ConnectTimeout=5",
                "node-b",
                "hostname"
            ]
        );
        let pdsh = RemoteShell {
            via: Via::Pdsh,
            ssh_port: Some(2222),
            extra: vec![],
        };
        let command = pdsh.command("node-b", "hostname");
        assert_eq!(argv(&command), ["pdsh", "-S", "-f", "1024", "-w", "node-b", "hostname"]);
        let env: Vec<(String, Option<String>)> = command
            .get_envs()
            .map(|(k, v)| (k.to_string_lossy().into(), v.map(|v| v.to_string_lossy().into())))
            .collect();
        assert!(env.contains(&("PDSH_RCMD_TYPE".into(), Some("ssh".into()))), "{env:?}");
        assert!(env.iter().any(|(k, v)| k == "PDSH_SSH_ARGS_APPEND"
            && v.as_deref().is_some_and(|v| v.ends_with("-o BatchMode=yes -p 2222"))));
        assert!(
            env.contains(&("KORMLM_TOKEN".into(), None)),
            "the token is not passed on: {env:?}"
        );
        let srun = RemoteShell {
            via: Via::Srun,
            ssh_port: None,
            extra: vec!["--partition=gpu".into()],
        };
        assert_eq!(
            argv(&srun.command("node-b", "hostname")),
            [
                "srun",
                "--nodes=1",
                "--ntasks=1",
                "--overlap",
                "--quiet",
                "--nodelist=node-b",
                "--partition=gpu",
                "sh",
                "-c",
                "hostname"
            ]
        );
        assert!(srun.forwards_stdin() && ssh.forwards_stdin() && !pdsh.forwards_stdin());
    }

    #[test]
    fn the_flags_choose_a_launcher() {
        let shell = |via| {
            RemoteStart::Shell(RemoteShell {
                via,
                ssh_port: None,
                extra: vec![],
            })
        };
        assert_eq!(
            choose(Some(LauncherKind::Ssh), None, None, true).unwrap(),
            shell(Via::Ssh)
        );
        assert_eq!(
            choose(Some(LauncherKind::None), None, None, true).unwrap(),
            RemoteStart::Print
        );
        let default = choose(None, None, None, true).unwrap();
        assert_eq!(default, shell(if on_path("pdsh") { Via::Pdsh } else { Via::Ssh }));
        for (kind, port, args, hostfile, expected) in [
            (
                Some(LauncherKind::Slurm),
                Some(22),
                None,
                true,
                "has no effect with --launcher slurm",
            ),
            (Some(LauncherKind::Ssh), None, None, false, "give --hostfile too"),
            (None, Some(22), None, false, "--ssh_port"),
            (
                Some(LauncherKind::None),
                Some(22),
                None,
                true,
                "no effect with --launcher none",
            ),
            (Some(LauncherKind::Ssh), None, Some("-o 'x"), true, "unbalanced quotes"),
        ] {
            let err = choose(kind, port, args, hostfile).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn the_worker_script_keeps_its_pid_and_quotes_its_words() {
        let script = worker_script(
            Path::new("/work dir"),
            &[("CUDA_VISIBLE_DEVICES".into(), "0,1".into())],
            2,
            Path::new("/opt/kormlm/worker"),
            &["--rank".into(), "3".into(), "--coordinator".into(), "http://c:1".into()],
        );
        assert_eq!(
            script,
            "cd '/work dir' || exit 1; echo kormlm-remote-pid $$; \
             t=$(( $(nproc 2>/dev/null || echo 1) / 2 )); [ \"$t\" -ge 1 ] || t=1; \
             exec env CUDA_VISIBLE_DEVICES=0,1 OMP_NUM_THREADS=$t /opt/kormlm/worker --rank 3 --coordinator http://c:1"
        );
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(remote_pid("node-b: kormlm-remote-pid 4242"), Some(4242));
        assert_eq!(remote_pid("kormlm-remote-pid 17\n"), Some(17));
        assert_eq!(remote_pid("other output"), None);
        assert_eq!(
            kill_script(4242, Signal::SIGTERM),
            "kill -TERM -- -4242 2>/dev/null || kill -TERM 4242"
        );
    }

    #[test]
    fn the_script_runs_in_a_posix_shell() {
        let dir = std::env::temp_dir();
        let script = worker_script(
            &dir,
            &[],
            1,
            Path::new("sh"),
            &["-c".into(), "echo $OMP_NUM_THREADS $$".into()],
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let pid = remote_pid(lines[0]).unwrap();
        let words: Vec<&str> = lines[1].split_whitespace().collect();
        assert!(words[0].parse::<u32>().unwrap() >= 1, "{text}");
        assert_eq!(words[1], pid.to_string(), "the worker keeps the shell's pid: {text}");
    }
}
