//! The Kubernetes manifests of `configs/kubernetes/`: every document checked against the official
//! Kubernetes Python client's typed models (unknown or misspelt fields and wrong types fail),
//! their cross-references (selectors and labels, claims, the Secret, the ConfigMap, ports and
//! probes, the Indexed Job's size against the coordinator's world size), and their command lines
//! run against the real binaries: the coordinator's with `--dry-run`, every rank's worker command
//! parse-only (`--help` last, so every flag before it is still checked).

use kormlm_e2e::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn manifests_dir() -> PathBuf {
    workspace_root().join("configs/kubernetes")
}

/// Every document of every manifest, validated by the Python client's models.
fn documents() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let out = run(std::process::Command::new(oracle_python())
        .arg(workspace_root().join("tests/python/kubernetes_manifests.py"))
        .args(&files));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = parsed["problems"].as_array().unwrap();
    assert!(
        problems.is_empty(),
        "the manifests do not match the Kubernetes API:\n{problems:#?}"
    );
    parsed["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["document"].clone())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The value of `--flag` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("no {name} in {args:?}"));
    &args[at + 1]
}

/// The port of `HOST:PORT`.
fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Every label a selector asks for is on the pod template.
fn assert_selects(selector: &Value, template: &Value, what: &str) {
    let labels = template["metadata"]["labels"].as_object().unwrap();
    let wanted = selector.as_object().unwrap();
    assert!(!wanted.is_empty(), "{what}: empty selector");
    for (k, v) in wanted {
        assert_eq!(
            labels.get(k),
            Some(v),
            "{what}: selector {k}={v} is not on the pods ({labels:?})"
        );
    }
}

/// A container's named port.
fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name} in {container}"))
}

/// The volumes of a pod spec by name; every mount names one of them, claims and config maps
/// exist in the manifests, secrets are `kormlm-token` with an owner-only mode.
fn check_volumes(docs: &[Value], pod: &Value) -> BTreeMap<String, Value> {
    let volumes: BTreeMap<String, Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect();
    for container in pod["containers"].as_array().unwrap() {
        for mount in container["volumeMounts"].as_array().unwrap() {
            let name = mount["name"].as_str().unwrap();
            assert!(volumes.contains_key(name), "mount of an undefined volume {name}");
        }
    }
    for volume in volumes.values() {
        if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            find(docs, "PersistentVolumeClaim", claim);
        }
        if let Some(map) = volume["configMap"]["name"].as_str() {
            find(docs, "ConfigMap", map);
        }
        if volume.get("secret").is_some() {
            assert_eq!(volume["secret"]["secretName"], "kormlm-token");
            let mode = volume["secret"]["defaultMode"]
                .as_u64()
                .expect("an explicit defaultMode");
            assert!(mode == 0o400 || mode == 0o600, "secret mode {mode:o}");
        }
    }
    volumes
}

/// Where each container path of `pod`'s mounts lives in this test: a directory under `root`
/// named after the volume (a ConfigMap volume gets its data as files).
fn mapped_paths(docs: &[Value], pod: &Value, container: &Value, root: &Path) -> Vec<(String, PathBuf)> {
    let volumes = check_volumes(docs, pod);
    let mut mapped = Vec::new();
    for mount in container["volumeMounts"].as_array().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let local = root.join(name);
        std::fs::create_dir_all(&local).unwrap();
        if let Some(map) = volumes[name]["configMap"]["name"].as_str() {
            for (file, text) in find(docs, "ConfigMap", map)["data"].as_object().unwrap() {
                std::fs::write(local.join(file), text.as_str().unwrap()).unwrap();
            }
        }
        if volumes[name].get("secret").is_some() {
            let token = local.join("token");
            std::fs::write(&token, "not-a-real-token\n").unwrap();
            std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
        }
        mapped.push((mount["mountPath"].as_str().unwrap().to_string(), local));
    }
    // Longest paths first, so a nested mount wins.
    mapped.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    mapped
}

/// `value` with a container path replaced by its local directory.
fn map_path(value: &str, mapped: &[(String, PathBuf)]) -> String {
    for (path, local) in mapped {
        if let Some(rest) = value.strip_prefix(path.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("{}{rest}", local.display());
            }
        }
    }
    value.to_string()
}

/// Kubelet's `$(VAR)` expansion of an argument with the container's plain `env` values and
/// `extra` (what the Job controller injects); a reference to an undefined variable fails.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find(')').expect("a closing parenthesis") + start;
        let name = &rest[start + 2..end];
        out.push_str(
            env.get(name)
                .unwrap_or_else(|| panic!("$({name}) is not defined for {arg}")),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A container's plain `env` values (paths mapped).
fn plain_env(container: &Value, mapped: &[(String, PathBuf)]) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .filter_map(|v| Some((v["name"].as_str()?.to_string(), map_path(v["value"].as_str()?, mapped))))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_manifests_match_the_kubernetes_api_and_each_other() {
    let docs = documents();
    let config = find(&docs, "ConfigMap", "kormlm-config");
    let ds: Value = serde_json::from_str(config["data"]["ds_config.json"].as_str().unwrap()).unwrap();
    let original: Value = serde_json::from_str(&read(&workspace_root().join("configs/ds_config.json"))).unwrap();
    assert_eq!(
        ds, original,
        "the ConfigMap's ds_config.json is not configs/ds_config.json"
    );

    // The coordinator: one replica, never two at once, its state on a claim.
    let deployment = find(&docs, "Deployment", "kormlm-coordinator");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["strategy"]["type"], "Recreate");
    assert_selects(&spec["selector"]["matchLabels"], &spec["template"], "the Deployment");
    let pod = &spec["template"]["spec"];
    let coordinator = &pod["containers"][0];
    let args = strings(&coordinator["args"]);
    let grpc = container_port(coordinator, "grpc");
    let metrics = container_port(coordinator, "metrics");
    assert_eq!(port_of(flag(&args, "--listen")), grpc);
    assert_eq!(port_of(flag(&args, "--metrics-listen")), metrics);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(coordinator[probe]["grpc"]["port"].as_u64(), Some(grpc), "{probe}");
    }
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], metrics.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let volumes = check_volumes(&docs, pod);
    let state_mount = coordinator["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| flag(&args, "--state-dir").starts_with(m["mountPath"].as_str().unwrap()))
        .expect("--state-dir on a mounted volume");
    let state_volume = &volumes[state_mount["name"].as_str().unwrap()];
    let state_claim = state_volume["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("the state on a claim");
    assert_eq!(
        strings(&find(&docs, "PersistentVolumeClaim", state_claim)["spec"]["accessModes"]),
        ["ReadWriteOnce"]
    );
    let token_env = coordinator["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "KORMLM_TOKEN")
        .expect("KORMLM_TOKEN from the Secret");
    assert_eq!(token_env["valueFrom"]["secretKeyRef"]["name"], "kormlm-token");
    assert_eq!(token_env["valueFrom"]["secretKeyRef"]["key"], "token");

    let service = find(&docs, "Service", "kormlm-coordinator");
    assert_selects(
        &service["spec"]["selector"],
        &spec["template"],
        "the coordinator's Service",
    );
    let service_port = |target: &str| {
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["targetPort"] == target)
            .and_then(|p| p["port"].as_u64())
            .unwrap_or_else(|| panic!("the Service does not expose {target}"))
    };
    let grpc_service_port = service_port("grpc");
    service_port("metrics");

    // The workers: an Indexed Job of world-size pods, one GPU each, rank = completion index.
    let world: u64 = flag(&args, "--world_size").parse().unwrap();
    let max_restarts: u64 = flag(&args, "--max_restarts").parse().unwrap();
    let job = find(&docs, "Job", "kormlm-workers");
    let job_spec = &job["spec"];
    assert_eq!(job_spec["completionMode"], "Indexed");
    assert_eq!(job_spec["completions"].as_u64(), Some(world));
    assert_eq!(job_spec["parallelism"].as_u64(), Some(world));
    assert!(
        job_spec["backoffLimit"].as_u64().unwrap() >= (max_restarts + 1) * world,
        "backoffLimit must allow every rank to fail once per attempt"
    );
    let worker_pod = &job_spec["template"]["spec"];
    assert_eq!(worker_pod["restartPolicy"], "OnFailure");
    let headless = find(&docs, "Service", worker_pod["subdomain"].as_str().expect("a subdomain"));
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_selects(
        &headless["spec"]["selector"],
        &job_spec["template"],
        "the workers' Service",
    );
    let worker = &worker_pod["containers"][0];
    assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], "1");
    let worker_args = strings(&worker["args"]);
    assert_eq!(flag(&worker_args, "--rank"), "$(JOB_COMPLETION_INDEX)");
    let service_name = service["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        flag(&worker_args, "--coordinator"),
        format!("http://{service_name}:{grpc_service_port}")
    );
    let worker_volumes = check_volumes(&docs, worker_pod);
    assert!(worker_volumes
        .values()
        .any(|v| v["secret"]["secretName"] == "kormlm-token"));
    let token_file = plain_env(worker, &[])["KORMLM_TOKEN_FILE"].clone();
    assert!(
        worker["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| worker_volumes[m["name"].as_str().unwrap()].get("secret").is_some()
                && token_file.starts_with(m["mountPath"].as_str().unwrap())),
        "KORMLM_TOKEN_FILE {token_file} is not on the Secret's mount"
    );
    // Outputs and checkpoints are on a volume every rank and the coordinator share.
    let output = flag(&args, "--output_dir");
    let shared_claim = |pod: &Value, container: &Value| -> String {
        let volumes = check_volumes(&docs, pod);
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| output.starts_with(m["mountPath"].as_str().unwrap()))
            .and_then(|m| volumes[m["name"].as_str().unwrap()]["persistentVolumeClaim"]["claimName"].as_str())
            .unwrap_or_else(|| panic!("{output} is not on a claim in {container}"))
            .to_string()
    };
    let claim = shared_claim(pod, coordinator);
    assert_eq!(shared_claim(worker_pod, worker), claim);
    assert_eq!(
        strings(&find(&docs, "PersistentVolumeClaim", &claim)["spec"]["accessModes"]),
        ["ReadWriteMany"]
    );
}

#[test]
fn the_manifests_command_lines_are_accepted_by_the_binaries() {
    let docs = documents();
    let dir = tempfile::tempdir().unwrap();

    let deployment = find(&docs, "Deployment", "kormlm-coordinator");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(strings(&container["command"]), ["coordinator"]);
    let mapped = mapped_paths(&docs, pod, container, &dir.path().join("coordinator"));
    let env = plain_env(container, &mapped);
    let args: Vec<String> = strings(&container["args"])
        .iter()
        .map(|a| map_path(&expand(a, &env), &mapped))
        .collect();
    let out = run(std::process::Command::new(binary("coordinator"))
        .args(&args)
        .arg("--dry-run")
        .envs(&env)
        .env("KORMLM_TOKEN", "not-a-real-token"));
    assert!(
        out.status.success(),
        "coordinator {args:?} --dry-run:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let world = flag(&args, "--world_size").parse::<u64>().unwrap();
    assert_eq!(plan["job"]["world_size"].as_u64(), Some(world), "{plan}");
    assert_eq!(plan["job"]["device"], "CUDA", "{plan}");
    // The original project's batch on 4 GPUs: 128 = 32 x 1 x 4.
    assert_eq!(plan["job"]["batch"]["train_batch_size"], 128, "{plan}");
    assert_eq!(plan["job"]["batch"]["train_micro_batch_size_per_gpu"], 32, "{plan}");

    let job = find(&docs, "Job", "kormlm-workers");
    let pod = &job["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(strings(&container["command"]), ["worker"]);
    let mapped = mapped_paths(&docs, pod, container, &dir.path().join("worker"));
    for index in 0..job["spec"]["completions"].as_u64().unwrap() {
        let mut env = plain_env(container, &mapped);
        env.insert("JOB_COMPLETION_INDEX".into(), index.to_string());
        let args: Vec<String> = strings(&container["args"])
            .iter()
            .map(|a| map_path(&expand(a, &env), &mapped))
            .collect();
        assert_eq!(flag(&args, "--rank"), index.to_string());
        // `--help` last: clap checks every flag and value before it, then prints the help.
        let out = run(std::process::Command::new(binary("worker"))
            .args(&args)
            .arg("--help")
            .envs(&env));
        assert!(
            out.status.success(),
            "worker {args:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // KORMLM_TOKEN_FILE is the Secret's file.
        assert!(Path::new(&env["KORMLM_TOKEN_FILE"]).is_file(), "{env:?}");
    }
    // A renamed flag is refused the same way, so the check above can fail.
    let out = run(std::process::Command::new(binary("worker")).args(["--ranks", "0", "--help"]));
    assert!(!out.status.success());
}
