//! Oracle tests: kormlm's tokenizer, ELECTRA model and fill-mask against Python transformers on
//! tiny random models and a WordPiece vocabulary trained here on the shared corpora.

mod common;

use common::logits_diff;
use kormlm_e2e::{
    oracle, oracle_python, oracle_vocabulary, run, run_with_input, shared_data, workspace_root, Fixture, Proc,
};
use kormlm_worker::model::{ElectraConfig, LoadedModel, ModelError};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use tch::Device;

/// Vocabulary and models, made once per test binary.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let f = Fixture::new();
        oracle_vocabulary(&f.path("tok"), 8000);
        let tok = f.s("tok");
        // embedding 32 != hidden 64: has embeddings_project; safetensors.
        oracle(&["model", &f.s("proj"), "--tokenizer", &tok, "--seed", "1"]);
        // embedding == hidden: no embeddings_project; pytorch_model.bin.
        oracle(&[
            "model",
            &f.s("bin"),
            "--tokenizer",
            &tok,
            "--embedding",
            "64",
            "--format",
            "bin",
            "--seed",
            "2",
        ]);
        oracle(&[
            "model",
            &f.s("sharded"),
            "--tokenizer",
            &tok,
            "--embedding",
            "64",
            "--format",
            "sharded",
            "--seed",
            "3",
        ]);
        oracle(&[
            "model",
            &f.s("disc"),
            "--tokenizer",
            &tok,
            "--embedding",
            "64",
            "--kind",
            "discriminator",
            "--format",
            "bin",
            "--seed",
            "4",
        ]);
        f
    })
}

#[test]
fn logits_match_transformers_with_embeddings_project_safetensors() {
    let f = fixture();
    let diff = logits_diff(&f.path("proj"), f.dir.path(), "proj");
    eprintln!("logits max abs diff (embeddings_project, safetensors): {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn logits_match_transformers_without_project_pytorch_bin() {
    let f = fixture();
    let diff = logits_diff(&f.path("bin"), f.dir.path(), "bin");
    eprintln!("logits max abs diff (no projection, pytorch_model.bin): {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn logits_match_transformers_sharded_safetensors() {
    let f = fixture();
    assert!(f.path("sharded/model.safetensors.index.json").is_file());
    let diff = logits_diff(&f.path("sharded"), f.dir.path(), "sharded");
    eprintln!("logits max abs diff (sharded safetensors): {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn kormlm_saved_model_loads_in_transformers_with_identical_logits() {
    let f = fixture();
    let loaded = LoadedModel::load(f.path("proj").to_str().unwrap(), None, Device::Cpu).unwrap();
    let saved = f.path("resaved");
    loaded.save(&saved).unwrap();
    let config: Value = serde_json::from_str(&std::fs::read_to_string(saved.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "electra");
    assert_eq!(config["architectures"], serde_json::json!(["ElectraForMaskedLM"]));
    assert!(saved.join("model.safetensors").is_file() && saved.join("vocab.txt").is_file());
    let diff = logits_diff(&saved, f.dir.path(), "resaved");
    eprintln!("logits max abs diff (saved by kormlm, loaded by transformers): {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn discriminator_checkpoint_loads_with_the_expected_new_keys() {
    let f = fixture();
    let expected: Value = serde_json::from_str(&oracle(&["new-keys", &f.s("disc")])).unwrap();
    let loaded = LoadedModel::load(f.path("disc").to_str().unwrap(), None, Device::Cpu).unwrap();
    let missing: Vec<String> = expected["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // transformers lists the tied output projection too; kormlm ties it and never lists it.
    let missing: Vec<String> = missing
        .into_iter()
        .filter(|k| k != "generator_lm_head.weight")
        .collect();
    assert_eq!(loaded.report.newly_initialized, missing);
    let unexpected: Vec<String> = expected["unexpected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(loaded.report.unused, unexpected);
    assert!(loaded
        .report
        .newly_initialized
        .contains(&"generator_predictions.dense.weight".to_string()));
}

#[test]
fn wrong_shapes_and_missing_weights_name_the_key() {
    let f = fixture();
    let dir = f.path("broken");
    std::fs::create_dir_all(&dir).unwrap();
    for file in [
        "model.safetensors",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(f.path("proj").join(file), dir.join(file)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(f.path("proj/config.json")).unwrap()).unwrap();
    config["intermediate_size"] = 96.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = LoadedModel::load(dir.to_str().unwrap(), None, Device::Cpu)
        .err()
        .unwrap();
    match &err {
        ModelError::Shape {
            key, expected, found, ..
        } => {
            assert!(key.contains("intermediate.dense"), "{err}");
            assert_eq!((expected[0], found[0]), (96, 128));
        }
        other => panic!("unexpected error {other}"),
    }
    config["intermediate_size"] = 128.into();
    config["num_hidden_layers"] = 3.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = LoadedModel::load(dir.to_str().unwrap(), None, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("required weights missing: electra.encoder.layer.2."),
        "{err}"
    );
}

#[test]
fn config_defaults_follow_electra_config() {
    let c = ElectraConfig::default();
    assert_eq!(
        (c.vocab_size, c.embedding_size, c.hidden_size, c.num_attention_heads),
        (30522, 128, 256, 4)
    );
    assert_eq!(c.intermediate_size, 1024);
    // Every field kormlm reads has transformers' default.
    let out = run(Command::new(oracle_python()).args([
        "-c",
        "import json; from transformers import ElectraConfig; print(json.dumps(ElectraConfig().to_dict()))",
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = serde_json::to_value(&c).unwrap();
    let fields = ours.as_object().unwrap();
    assert!(fields.len() >= 16, "{ours}");
    for (key, value) in fields {
        assert_eq!(value, &theirs[key], "ElectraConfig default of {key}");
    }
}

/// The worker built for this test run, with `input` on stdin and `env` added.
fn run_worker(args: &[&str], input: &[u8], env: &[(&str, &str)]) -> std::process::Output {
    run_with_input(
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(args)
            .envs(env.iter().copied()),
        input,
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn compare_fill_mask(masks: usize) {
    let f = fixture();
    let input = f.path(&format!("masked{masks}.txt"));
    let nsmc = shared_data().join("nsmc/ratings_test.txt");
    oracle(&[
        "masked",
        nsmc.to_str().unwrap(),
        input.to_str().unwrap(),
        "--n",
        "520",
        "--masks",
        &masks.to_string(),
    ]);
    let expected_path = f.path(&format!("masked{masks}.expected.jsonl"));
    oracle(&[
        "fill-mask",
        &f.s("proj"),
        input.to_str().unwrap(),
        expected_path.to_str().unwrap(),
    ]);
    let out = run_worker(
        &["fill-mask", "--model", &f.s("proj")],
        &std::fs::read(&input).unwrap(),
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = json_lines(&String::from_utf8(out.stdout).unwrap());
    let expected = json_lines(&std::fs::read_to_string(&expected_path).unwrap());
    assert_eq!(ours.len(), expected.len());
    assert_eq!(ours.len(), 520, "one prediction line per masked line the oracle wrote");
    for (line, (a, b)) in ours.iter().zip(&expected).enumerate() {
        let (a_masks, b_masks): (Vec<&Value>, Vec<&Value>) = if masks == 1 {
            (vec![a], vec![b])
        } else {
            (
                a.as_array().unwrap().iter().collect(),
                b.as_array().unwrap().iter().collect(),
            )
        };
        assert_eq!(a_masks.len(), b_masks.len(), "line {line}");
        for (pa, pb) in a_masks.iter().zip(&b_masks) {
            let (pa, pb) = (pa.as_array().unwrap(), pb.as_array().unwrap());
            assert_eq!(pa.len(), 5, "line {line}");
            for (x, y) in pa.iter().zip(pb.iter()) {
                let keys: Vec<&String> = x.as_object().unwrap().keys().collect();
                assert_eq!(
                    keys,
                    ["score", "token", "token_str", "sequence"],
                    "field order, line {line}"
                );
                assert_eq!(x["token"], y["token"], "line {line}: {x} vs {y}");
                assert_eq!(x["token_str"], y["token_str"], "line {line}");
                assert_eq!(x["sequence"], y["sequence"], "line {line}");
                let d = (x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs();
                assert!(d <= 1e-5, "line {line}: score differs by {d}");
            }
        }
    }
}

#[test]
fn fill_mask_matches_the_pipeline_with_one_mask() {
    compare_fill_mask(1);
}

#[test]
fn fill_mask_matches_the_pipeline_with_two_masks() {
    compare_fill_mask(2);
}

#[test]
fn fill_mask_targets_and_lines_without_a_mask() {
    let f = fixture();
    let input = f.path("targets.txt");
    std::fs::write(&input, "영화 [MASK] 재밌다\n마스크 없는 줄\n정말 [MASK]\n").unwrap();
    let expected_path = f.path("targets.expected.jsonl");
    oracle(&[
        "fill-mask",
        &f.s("proj"),
        input.to_str().unwrap(),
        expected_path.to_str().unwrap(),
        "--targets",
        "영화,정말,재밌",
    ]);
    let out = run_worker(
        &["fill-mask", "--model", &f.s("proj"), "--targets", "영화,정말,재밌"],
        &std::fs::read(&input).unwrap(),
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = json_lines(&String::from_utf8(out.stdout).unwrap());
    let expected = json_lines(&std::fs::read_to_string(&expected_path).unwrap());
    assert_eq!(ours[1]["error"], "No mask_token ([MASK]) found on the input");
    assert!(expected[1]["error"]
        .as_str()
        .unwrap()
        .contains("No mask_token ([MASK]) found on the input"));
    for i in [0, 2] {
        let a: Vec<&Value> = ours[i].as_array().unwrap().iter().map(|p| &p["token"]).collect();
        let b: Vec<&Value> = expected[i].as_array().unwrap().iter().map(|p| &p["token"]).collect();
        assert_eq!(a, b, "line {i}");
    }
}

fn compare_tokenization(lines_file: &Path, tag: &str, max_len: usize) {
    let f = fixture();
    let expected_path = f.path(&format!("{tag}.tok.jsonl"));
    oracle(&[
        "tokenize",
        &f.s("tok"),
        lines_file.to_str().unwrap(),
        expected_path.to_str().unwrap(),
        "--max_len",
        &max_len.to_string(),
    ]);
    let out = run_worker(
        &[
            "tokenize",
            "--model",
            &f.s("tok"),
            "--max_seq_len",
            &max_len.to_string(),
            "--decode",
        ],
        &std::fs::read(lines_file).unwrap(),
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours = json_lines(&String::from_utf8(out.stdout).unwrap());
    let expected = json_lines(&std::fs::read_to_string(&expected_path).unwrap());
    assert_eq!(ours.len(), expected.len(), "{tag}: line count");
    for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
        assert_eq!(a["input_ids"], b["input_ids"], "{tag} line {}", i + 1);
        assert_eq!(a["decoded"], b["decoded"], "{tag} line {}", i + 1);
    }
}

#[test]
fn tokenizer_matches_bert_tokenizer_fast_on_every_nsmc_test_line() {
    compare_tokenization(&shared_data().join("nsmc/ratings_test.txt"), "nsmc", 100);
}

#[test]
fn tokenizer_matches_bert_tokenizer_fast_on_khs_dev() {
    compare_tokenization(&shared_data().join("korean-hate-speech/labeled/dev.tsv"), "khs", 512);
}

#[test]
fn tokenizer_edge_cases_match() {
    let f = fixture();
    let long: String = "가나다라마바사 ".repeat(1250);
    let cases = [
        "",
        "    ",
        "ㅋㅋㅋㅋ 😂😂 👍🏻",
        "漢字 섞인 文章 입니다",
        "제어\u{0007}문자\u{0000}와 탭\t그리고 \u{200b}폭없는 공백",
        "don't stop . , ! ?",
        "[MASK] [CLS] [SEP] [PAD] [UNK] 특수",
        &long,
    ];
    let path = f.path("edge.txt");
    std::fs::write(&path, cases.join("\n") + "\n").unwrap();
    compare_tokenization(&path, "edge", 512);
    compare_tokenization(&path, "edge-short", 8);
}

#[test]
fn invalid_utf8_input_is_a_clear_error() {
    let f = fixture();
    let out = run_worker(&["tokenize", "--model", &f.s("tok")], b"fine\nbad \xff\xfe byte\n", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdin line 2: invalid UTF-8 at byte 4"), "{err}");
}

/// The hub stand-in (`tests/python/hub_standin.py`), killed when dropped.
struct HubStandIn {
    _server: Proc,
    endpoint: String,
}

impl HubStandIn {
    fn start(repo: &str, revision: &str, dir: &Path) -> Self {
        use std::io::BufRead;
        let mut command = Command::new(oracle_python());
        command
            .arg(workspace_root().join("tests/python/hub_standin.py"))
            .args([repo, revision, dir.to_str().unwrap()])
            .stdout(Stdio::piped());
        let mut server = Proc::spawn("the hub stand-in", &mut command);
        // Its first line is the port it listens on (it exits, closing stdout, if it cannot).
        let mut line = String::new();
        std::io::BufReader::new(server.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the hub stand-in printed {line:?}, not its port"));
        Self {
            _server: server,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

#[test]
fn hub_ids_download_at_a_revision_then_work_offline_from_the_cache() {
    let f = fixture();
    let cache = tempfile::tempdir().unwrap();
    let home = cache.path().to_str().unwrap().to_string();
    let input = "영화 [MASK] 재밌다\n".as_bytes();
    let local = run_worker(&["fill-mask", "--model", &f.s("bin")], input, &[]);
    assert!(local.status.success());
    let args = ["fill-mask", "--model", "kormlm-test/tiny-electra", "--revision", "v1"];
    {
        let hub = HubStandIn::start("kormlm-test/tiny-electra", "v1", &f.path("bin"));
        let out = run_worker(&args, input, &[("HF_HOME", &home), ("HF_ENDPOINT", &hub.endpoint)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            out.stdout, local.stdout,
            "the downloaded model predicts like the local copy"
        );
    }
    // The stand-in is gone: the cache serves HF_HUB_OFFLINE=1, and a revision never fetched fails
    // with advice to pass a local directory.
    let out = run_worker(&args, input, &[("HF_HOME", &home), ("HF_HUB_OFFLINE", "1")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, local.stdout);
    let out = run_worker(
        &["fill-mask", "--model", "kormlm-test/tiny-electra", "--revision", "v2"],
        input,
        &[("HF_HOME", &home), ("HF_ENDPOINT", "http://127.0.0.1:9")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kormlm-test/tiny-electra@v2") && err.contains("pass a local model directory"),
        "{err}"
    );
}

#[test]
fn wordpiece_training_is_deterministic_and_agrees_with_the_tokenizers_trainer() {
    let f = fixture();
    let corpus = shared_data().join("korean-hate-speech/unlabeled/unlabeled_comments_5.txt");
    oracle(&[
        "vocab",
        &f.s("wp-hf"),
        "--text",
        corpus.to_str().unwrap(),
        "--size",
        "8000",
    ]);
    let vocab = |dir: &str| -> Vec<String> {
        let tokenizer = kormlm_worker::tokenizer::train_wordpiece(std::slice::from_ref(&corpus), 8000, 2).unwrap();
        std::fs::create_dir_all(f.path(dir)).unwrap();
        tokenizer.save(&f.path(dir)).unwrap();
        let text = std::fs::read_to_string(f.path(dir).join("vocab.txt")).unwrap();
        text.lines().map(str::to_string).collect()
    };
    let (first, second) = (vocab("wp-ours-1"), vocab("wp-ours-2"));
    assert_eq!(first, second, "the same corpus gives the same vocabulary, ids included");
    assert_eq!(first.len(), 8000);
    assert_eq!(&first[..5], &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]);
    // The upstream trainer breaks ties between equally frequent merges by hash-map order, so the
    // two agree up to those ties.
    let theirs: std::collections::HashSet<String> = std::fs::read_to_string(f.path("wp-hf").join("vocab.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let common = first.iter().filter(|t| theirs.contains(*t)).count();
    eprintln!(
        "WordPiece vocabulary: {common} of {} tokens shared with the tokenizers trainer ({} there)",
        first.len(),
        theirs.len()
    );
    assert!(
        common as f64 >= 0.99 * theirs.len() as f64,
        "{common} of {}",
        theirs.len()
    );
}
