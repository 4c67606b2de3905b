//! Unit tests of `tokenizer` (kept in their own file so that the module itself stays readable).
use super::*;
use crate::model::testutil::fixture;

fn golden_cases() -> Vec<Value> {
    let v = read_json(&fixture("golden/tokens.json")).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn sd15() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixture("tokenizer/clip")).unwrap()
}

fn sd2() -> ClipTokenizer {
    let clip = fixture("tokenizer/clip");
    let sd2 = fixture("tokenizer/clip-sd2");
    ClipTokenizer::from_files(
        &clip.join("vocab.json"),
        &clip.join("merges.txt"),
        &[
            sd2.join("tokenizer_config.json"),
            sd2.join("special_tokens_map.json"),
        ],
    )
    .unwrap()
}

fn check(tok: &ClipTokenizer, key: &str) {
    let cases = golden_cases();
    assert_eq!(cases.len(), 25);
    let mut failures = Vec::new();
    for c in &cases {
        let prompt = c["prompt"].as_str().unwrap();
        let got = tok.encode(prompt).unwrap();
        assert_eq!(got.len(), 77);
        if got != ids(&c[key]) {
            failures.push(format!(
                "{prompt:?}\n  got  {got:?}\n  want {:?}",
                ids(&c[key])
            ));
        }
        let n = c["n_tokens_untruncated"].as_u64().unwrap() as usize;
        assert_eq!(
            tok.tokenize_ids(prompt).unwrap().len() + 2,
            n,
            "{prompt:?} untruncated"
        );
    }
    assert!(
        failures.is_empty(),
        "{key}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sd15_matches_golden_tokens() {
    let t = sd15();
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id(), t.max_len()),
        (49406, 49407, 49407, 77)
    );
    check(&t, "sd15");
}

#[test]
fn the_truncated_part_of_a_long_prompt_is_named() {
    let t = sd15();
    assert_eq!(t.truncated_part("a photo of a cat").unwrap(), None);
    let words: Vec<String> = (0..80).map(|i| format!("cat{i}")).collect();
    let long = format!("{} purple elephant", words.join(" "));
    let cut = t.truncated_part(&long).unwrap().expect("cut");
    assert!(cut.ends_with("purple elephant"), "{cut}");
    assert!(!cut.contains("cat0 "), "{cut}");
    assert_eq!(
        t.decode(&t.tokenize_ids("Café, naïve!").unwrap()),
        "café , naïve !"
    );
}

#[test]
fn sd2_matches_golden_tokens() {
    let t = sd2();
    assert_eq!(t.pad_id(), 0);
    check(&t, "sd2");
}

/// Extra edge cases, ids from transformers 4.35.2's slow CLIPTokenizer (no ftfy).
#[test]
fn edge_cases_match_transformers() {
    let t = sd15();
    let cases: [(&str, &[u32]); 5] = [
        ("Hi<|ENDOFTEXT|>x", &[1883, 49407, 343]),
        ("a<|endoftext|>b!", &[320, 49407, 321, 256]),
        ("wow!! ok", &[2781, 748, 2481]),
        ("x\u{2028}y\u{85}z", &[343, 46451]),
        (
            "İstanbul ΣΑΣ",
            &[328, 16384, 11231, 139, 225, 138, 109, 139, 480],
        ),
    ];
    for (p, want) in cases {
        assert_eq!(t.tokenize_ids(p).unwrap(), want, "{p:?}");
    }
}

#[test]
fn tiny_model_tokenizers_load() {
    for m in ["tiny-sd15", "tiny-sd21"] {
        let t = ClipTokenizer::from_dir(&fixture(&format!("models/{m}/tokenizer"))).unwrap();
        assert_eq!((t.bos_id(), t.eos_id()), (1012, 1013), "{m}");
        let ids = t.encode("a photo of a cat, in the style of 東京!").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], 1012);
        assert!(ids.iter().all(|&i| i <= 1013), "{m}: {ids:?}");
    }
    let t = ClipTokenizer::from_dir(&fixture("models/tiny-sd21/tokenizer")).unwrap();
    assert_eq!(t.pad_id(), 0);
}

/// A `tokenizer.json`-only folder (fast tokenizer) with sd-turbo-style configs pads with
/// `!` (id 0), as transformers' `CLIPTokenizerFast` does, and encodes like the slow files.
#[test]
fn tokenizer_json_folders_take_the_pad_token_from_the_configs() {
    let src = fixture("models/tiny-sd21/tokenizer");
    let vocab: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<String> = std::fs::read_to_string(src.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "model": {"type": "BPE", "vocab": vocab, "merges": merges,
                  "end_of_word_suffix": "</w>", "unk_token": "<|endoftext|>"}
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let fast = ClipTokenizer::from_dir(dir.path()).unwrap();
    let slow = ClipTokenizer::from_dir(&src).unwrap();
    assert_eq!(fast.pad_id(), 0);
    let p = "a photo of a cat";
    assert_eq!(fast.encode(p).unwrap(), slow.encode(p).unwrap());
}

#[test]
fn missing_files_error_names_folder() {
    let e = ClipTokenizer::from_dir(&fixture("golden"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab.json") && e.contains("golden"), "{e}");
}
