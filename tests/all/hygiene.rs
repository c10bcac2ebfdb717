//! The sans-IO layers stay sans-IO: no sockets, no runtime, no async, no
//! clock reads in the codec and the protocol (`crates/corecast-protocol`)
//! or the engine. Time reaches the engine as an argument; IO lives in
//! `src/shard`. The library's modules import each other without a circle.

use std::path::Path;

const PURE: [&str; 2] = ["crates/corecast-protocol/src", "src/engine"];
const FORBIDDEN: [&str; 10] = [
    "monoio",
    "tokio",
    "async ",
    ".await",
    "std::net",
    "TcpStream",
    "Instant::now",
    "SystemTime",
    "std::thread",
    "Mutex",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn sans_io_layers_touch_no_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in PURE {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() >= 8, "found only {files:?}");
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                if code.contains(word) {
                    bad.push(format!(
                        "{}:{}: `{word}` in {}",
                        f.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "IO in a sans-IO layer:\n{}", bad.join("\n"));
}

/// The top-level modules a file's code names through `crate::` (in paths
/// and in `use crate::{…}` groups), its tests left out.
fn crate_refs(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Each item of the group at depth 1 starts with a module name.
            let mut depth = 1;
            let mut start = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start = true,
                    c if start && depth == 1 && !c.is_whitespace() => {
                        start = false;
                        out.push(ident(&group[k..]));
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out
}

/// Which top-level module of the library names which, from `src`.
fn module_graph() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: std::collections::BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let name = name.strip_suffix(".rs").unwrap_or(&name).to_string();
            (name != "lib" && name != "main").then_some(name)
        })
        .chain(
            // Crates of the workspace, re-exported under these names.
            ["ws", "protocol", "client"].map(String::from),
        )
        .collect();
    let mut graph: std::collections::BTreeMap<_, std::collections::BTreeSet<_>> =
        std::collections::BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap();
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        // Test modules (`tests/` folders inside `src`) may use any layer.
        if parts.iter().any(|p| p == "tests") {
            continue;
        }
        let top = parts[0]
            .strip_suffix(".rs")
            .unwrap_or(&parts[0])
            .to_string();
        if !modules.contains(&top) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let entry = graph.entry(top.clone()).or_default();
        for m in crate_refs(&text) {
            if m != top && modules.contains(&m) {
                entry.insert(m);
            }
        }
    }
    graph
}

#[test]
fn the_modules_import_each_other_without_a_circle() {
    let graph = module_graph();
    assert!(graph.len() >= 15, "found only {:?}", graph.keys());
    // Depth-first, keeping the path: a module met again on its own path
    // closes a circle.
    fn visit(
        m: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.to_string());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    for m in graph.keys() {
        if let Some(circle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("an import circle: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn the_engine_imports_only_the_pure_layers() {
    // The codec, the protocol, access grants, admission's refusal reasons,
    // LiveKit tokens and the metrics' counters: nothing that does IO or
    // knows of shards, nodes, the cluster or the configuration.
    const ALLOWED: [&str; 6] = [
        "ws",
        "protocol",
        "access",
        "admission",
        "livekit",
        "metrics",
    ];
    let graph = module_graph();
    let engine = &graph["engine"];
    assert!(engine.contains("protocol"), "{engine:?}");
    let bad: Vec<&String> = engine
        .iter()
        .filter(|m| !ALLOWED.contains(&m.as_str()))
        .collect();
    assert!(bad.is_empty(), "src/engine imports {bad:?}");
    // And those layers import nothing above the engine.
    for layer in ALLOWED {
        let above: Vec<&String> = graph
            .get(layer)
            .into_iter()
            .flatten()
            .filter(|m| !ALLOWED.contains(&m.as_str()))
            .collect();
        assert!(above.is_empty(), "{layer} imports {above:?}");
    }
}

#[test]
fn crate_references_are_found_in_paths_and_groups() {
    let text = "use crate::a::B;\nuse crate::{b, c::{D, E}, d::F};\nfn f() { crate::e::g(); }\n// crate::h\n#[cfg(test)]\nmod tests { use crate::i; }";
    assert_eq!(crate_refs(text), ["a", "b", "c", "d", "e"]);
}
