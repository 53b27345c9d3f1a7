//! The cargo-fuzz targets (`fuzz/`), run on stable as a bounded smoke test:
//! each target's body over its corpus, then over random and mutated inputs.
//! Real fuzzing (nightly) is described in `fuzz/README.md`.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

use proptest::prelude::*;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!inputs.is_empty(), "empty corpus {target}");
    inputs.sort();
    inputs
}

/// A corpus entry with a few bytes flipped, inserted or removed.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let inputs = corpus(target);
    (
        0..inputs.len(),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 1..6),
    )
        .prop_map(move |(i, edits)| {
            let mut input = inputs[i].clone();
            for (at, byte, op) in edits {
                let at = at % (input.len() + 1);
                match op {
                    0 if at < input.len() => input[at] = byte,
                    1 => input.insert(at, byte),
                    _ if at < input.len() => {
                        input.remove(at);
                    }
                    _ => input.push(byte),
                }
            }
            input
        })
}

#[test]
fn every_target_accepts_its_corpus() {
    for input in corpus("patch_body") {
        targets::patch_body(&input);
    }
    for input in corpus("cursor") {
        targets::cursor(&input);
    }
    for input in corpus("stream_query") {
        targets::stream_query(&input);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn patch_body_random(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        targets::patch_body(&data);
    }

    #[test]
    fn patch_body_mutated(data in mutated("patch_body")) {
        targets::patch_body(&data);
    }

    #[test]
    fn cursor_random(data in "\\PC{0,80}|[a-z:,0-9-]{0,40}") {
        targets::cursor(data.as_bytes());
    }

    #[test]
    fn cursor_mutated(data in mutated("cursor")) {
        targets::cursor(&data);
    }

    #[test]
    fn stream_query_random(data in "[a-zA-Z=&%0-9+._:,\n-]{0,120}|\\PC{0,80}") {
        targets::stream_query(data.as_bytes());
    }

    #[test]
    fn stream_query_mutated(data in mutated("stream_query")) {
        targets::stream_query(&data);
    }
}
