//! The module graph of every crate: no import circle between modules, and no worker module that
//! reaches back up the data flow (corpus → tokenizer → dataset → masking → batch → model →
//! optim/comm → train → job → daemon). A module's children may use their parent's items; any
//! other `crate::`, `super::` or `self::` path is an edge to the module it names.

use kormlm_e2e::workspace_root;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module path of a source file under `src` (`daemon/mod.rs` → `daemon`).
fn module_name(src: &Path, file: &Path) -> String {
    let relative = file
        .strip_prefix(src)
        .expect("the file is under src")
        .with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    if parts.is_empty() {
        "crate".into()
    } else {
        parts.join("::")
    }
}

/// The source without comments and without the trailing unit-test module.
fn code_of(source: &str) -> String {
    let source = source.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    source
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The longest known module a path (`crate::a::b::Item`, `super::x`) refers to.
fn resolve(current: &str, path: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    let mut segments: Vec<String> = match *path.first()? {
        "crate" => Vec::new(),
        "self" => current.split("::").map(str::to_string).collect(),
        "super" => {
            let mut base: Vec<String> = current.split("::").map(str::to_string).collect();
            let mut rest = path;
            while rest.first() == Some(&"super") {
                base.pop();
                rest = &rest[1..];
            }
            let mut joined = base;
            joined.extend(rest.iter().map(|s| s.to_string()));
            return longest_module(&joined, modules);
        }
        _ => return None,
    };
    segments.extend(path[1..].iter().map(|s| s.to_string()));
    longest_module(&segments, modules)
}

fn longest_module(segments: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|k| segments[..k].join("::"))
        .find(|name| modules.contains(name))
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every `crate::…`, `super::…` and `self::…` path in the code, with `{a, b}` groups expanded
/// one level.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !is_ident(chars[i - 1]);
        let rest: String = chars[i..chars.len().min(i + 7)].iter().collect();
        let root = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|r| rest.starts_with(r));
        if let (true, Some(_)) = (starts_word, root) {
            let mut j = i;
            let mut path = String::new();
            while j < chars.len() && (is_ident(chars[j]) || chars[j] == ':') {
                path.push(chars[j]);
                j += 1;
            }
            let prefix: Vec<String> = path.trim_end_matches(':').split("::").map(str::to_string).collect();
            if j < chars.len() && chars[j] == '{' {
                let end = chars[j..].iter().position(|&c| c == '}').map_or(chars.len(), |p| j + p);
                let group: String = chars[j + 1..end].iter().collect();
                for item in group.split(',') {
                    let name: String = item.trim().chars().take_while(|&c| is_ident(c)).collect();
                    if !name.is_empty() {
                        let mut full = prefix.clone();
                        full.push(name);
                        found.push(full);
                    }
                }
            }
            found.push(prefix);
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn graph_of(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let sources: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (module_name(src, f), code_of(&text))
        })
        .collect();
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(module, code)| {
            let edges = paths_in(code)
                .iter()
                .filter_map(|path| {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    resolve(module, &path, &modules)
                })
                .filter(|target| target != module && !module.starts_with(&format!("{target}::")))
                .collect();
            (module.clone(), edges)
        })
        .collect()
}

/// The strongly connected components with more than one module (Tarjan).
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w.as_str()]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w.as_str()) {
                    let low = self.low[v].min(self.index[w.as_str()]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn no_crate_has_an_import_circle() {
    for krate in ["proto", "coordinator", "worker", "tests"] {
        let graph = graph_of(&workspace_root().join(krate).join("src"));
        assert!(graph.len() > 5, "{krate}: too few modules read ({})", graph.len());
        let found = circles(&graph);
        assert!(found.is_empty(), "{krate} has import circles: {found:?}");
    }
}

/// The worker's data flow: each top-level module's place; optim and comm share one.
const WORKER_FLOW: [(&str, usize); 11] = [
    ("corpus", 0),
    ("tokenizer", 1),
    ("dataset", 2),
    ("masking", 3),
    ("batch", 4),
    ("model", 5),
    ("optim", 6),
    ("comm", 6),
    ("train", 7),
    ("job", 8),
    ("daemon", 9),
];

/// Edges from a module to one later in `flow`.
fn backward_edges(graph: &Graph, flow: &[(&str, usize)]) -> Vec<String> {
    let place = |module: &str| {
        let top = module.split("::").next().unwrap_or_default();
        flow.iter().find(|(name, _)| *name == top).map(|(_, place)| *place)
    };
    let mut backwards = Vec::new();
    for (module, targets) in graph {
        for target in targets {
            if let (Some(from), Some(to)) = (place(module), place(target)) {
                if to > from {
                    backwards.push(format!("{module} -> {target}"));
                }
            }
        }
    }
    backwards
}

#[test]
fn the_worker_never_reaches_back_up_the_data_flow() {
    let graph = graph_of(&workspace_root().join("worker/src"));
    let backwards = backward_edges(&graph, &WORKER_FLOW);
    assert!(
        backwards.is_empty(),
        "modules reaching back up the data flow: {backwards:?}"
    );
}

#[test]
fn the_checker_sees_a_circle_and_a_backward_edge() {
    // The checker itself on a made-up crate: a ↔ b is a circle, children using parents are not.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "use crate::b::Thing;\npub mod child;\n").unwrap();
    std::fs::write(src.join("a/child.rs"), "use super::Parent;\n").unwrap();
    std::fs::write(src.join("b.rs"), "use crate::{a::X, c};\n").unwrap();
    let graph = graph_of(src);
    assert_eq!(graph["b"], BTreeSet::from(["a".to_string()]));
    assert!(graph["a::child"].is_empty());
    assert_eq!(circles(&graph), vec![vec!["a".to_string(), "b".to_string()]]);
    // With b placed before a in the flow, b using a reaches back up.
    assert_eq!(
        backward_edges(&graph, &[("b", 0), ("a", 1)]),
        vec!["b -> a".to_string()]
    );
}
