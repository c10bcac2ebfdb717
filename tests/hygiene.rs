//! The sans-IO layers stay sans-IO: no sockets, no runtime, no async, no
//! clock reads in the codec, the protocol or the engine. Time reaches the
//! engine as an argument; IO lives in `src/shard`.

use std::path::Path;

const PURE: [&str; 3] = ["src/ws", "src/protocol", "src/engine"];
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
