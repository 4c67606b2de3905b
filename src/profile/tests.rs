//! Unit tests of `profile` (kept in their own file so that the module itself stays readable).
use super::*;

/// Seeded mutation fuzzing of the profile parser (bounded: 3000 mutants of the shipped
/// profiles, a few seconds): no input panics, every error names the file, and an error with a
/// position points inside the text. `with_set` gets the same treatment for values.
#[test]
fn mutated_profiles_never_panic() {
    use rand::{Rng, SeedableRng};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let bases: Vec<String> = ["anime.toml", "watercolor-lcm.toml", "demo.toml"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();
    let tokens: [&str; 14] = [
        "=",
        "[",
        "]]",
        "\"",
        "\n[stream]\n",
        "1e-20",
        "-1",
        "nan",
        "inf",
        "{",
        "}",
        ",",
        "\u{e9}\u{1f600}",
        "18446744073709551616",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5dca);
    let (mut tried, mut refused) = (0, 0);
    for n in 0..3000 {
        let mut t = bases[n % bases.len()].clone().into_bytes();
        for _ in 0..rng.random_range(1..5) {
            let at = rng.random_range(0..=t.len());
            match rng.random_range(0..4) {
                0 => t.insert(at, rng.random_range(0x20..0x7f)),
                1 if at < t.len() => {
                    t.remove(at);
                }
                2 => {
                    let tok = tokens[rng.random_range(0..tokens.len())].as_bytes();
                    t.splice(at..at, tok.iter().copied());
                }
                _ => t.truncate(at),
            }
        }
        let Ok(text) = String::from_utf8(t) else {
            continue;
        };
        tried += 1;
        if let Err(e) = parse(&text, "m.toml") {
            refused += 1;
            let msg = e.to_string();
            assert!(msg.contains("m.toml"), "{msg}");
            for p in &e.problems {
                if let Some((line, _)) = p.at {
                    assert!(
                        line >= 1 && line <= text.lines().count().max(1) + 1,
                        "{msg}"
                    );
                }
            }
        }
    }
    // The mutations reach both outcomes (the test exercises the parser, not one path).
    assert!(
        tried > 2000 && refused > 300 && tried - refused > 300,
        "{tried} {refused}"
    );
    let lp = LoadedProfile::load(&dir.join("demo.toml")).unwrap();
    for v in [
        "",
        "[",
        "\"",
        "1e400",
        "-0",
        "[1,",
        "{a=1}",
        "\u{0}",
        "x".repeat(100_000).as_str(),
    ] {
        for key in [
            "guidance_scale",
            "stream.t_index_list",
            "output.fps",
            "prompt",
            "model.lora",
        ] {
            let _ = lp.with_set(key, v);
        }
    }
}

/// Every numeric key of the schema, with the values just outside its range (and NaN,
/// infinities) refused, and its bounds accepted, both in a profile file (with file, line and
/// key) and through `set`, with the same message.
#[test]
fn every_numeric_key_is_range_checked_in_profiles_and_set_alike() {
    // The table covers every numeric key of the schema (new keys must be added to RANGES).
    let defaults = toml::Value::try_from(Profile::default()).unwrap();
    for key in known_keys() {
        let mut v = &defaults;
        for part in key.split('.') {
            v = v.get(part).unwrap_or(&toml::Value::Boolean(false));
        }
        let numeric = match v {
            toml::Value::Integer(_) | toml::Value::Float(_) => true,
            toml::Value::Array(a) => a.iter().any(|x| x.is_integer() || x.is_float()),
            _ => false,
        };
        if numeric {
            assert!(range_of(&key).is_some(), "{key} has no range in RANGES");
        }
    }
    for k in ["source.region.x", "model.lora[0].scale"] {
        assert!(range_of(k).is_some(), "{k}");
    }
    let floats = [
        "source.fps",
        "output.fps",
        "output.idle_fps",
        "model.lora.scale",
        "stream.guidance_scale",
        "stream.delta",
        "stream.similarity_threshold",
    ];
    for &(key, lo, hi) in RANGES {
        let float = floats.contains(&key);
        let fmt = |v: f64| {
            if float {
                format!("{v:?}")
            } else {
                format!("{}", v as i64)
            }
        };
        let step = if float { 0.0005 } else { 1.0 };
        let mut cases: Vec<(String, bool)> = vec![(fmt(lo), true), (fmt(lo - step), false)];
        if key != "stream.seed" {
            cases.push((fmt(hi), true));
            cases.push((fmt(hi + step), false));
        } else {
            cases.push((i64::MAX.to_string(), true));
        }
        if float {
            for v in ["nan", "inf", "-inf", "1e300"] {
                cases.push((v.to_string(), false));
            }
        }
        for (v, ok) in cases {
            // (table, key in the table, value as written, extra keys, the `set` key and
            // value, the key errors name)
            let (table, field) = key.rsplit_once('.').unwrap();
            let (table, line, set_key, set_val, named) = match key {
                "source.region.x"
                | "source.region.y"
                | "source.region.width"
                | "source.region.height" => {
                    let mut r = [
                        ("x", "0".to_string()),
                        ("y", "0".to_string()),
                        ("width", "64".to_string()),
                        ("height", "64".to_string()),
                    ];
                    for f in r.iter_mut() {
                        if f.0 == field {
                            f.1 = v.clone();
                        }
                    }
                    let inline = format!(
                        "{{ {} }}",
                        r.iter()
                            .map(|(k, v)| format!("{k} = {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    (
                        "source",
                        format!("region = {inline}"),
                        "source.region".to_string(),
                        inline,
                        key.to_string(),
                    )
                }
                "model.lora.scale" => {
                    let inline = format!("[{{ id = \"l.safetensors\", scale = {v} }}]");
                    (
                        "model",
                        format!("lora = {inline}"),
                        "model.lora".to_string(),
                        inline,
                        "model.lora[0].scale".to_string(),
                    )
                }
                "stream.t_index_list" => (
                    table,
                    format!("num_inference_steps = 1000\nt_index_list = [{v}]"),
                    key.to_string(),
                    format!("[{v}]"),
                    key.to_string(),
                ),
                "stream.num_inference_steps" => (
                    table,
                    format!("t_index_list = [0]\n{field} = {v}"),
                    key.to_string(),
                    v.clone(),
                    key.to_string(),
                ),
                _ => (
                    table,
                    format!("{field} = {v}"),
                    key.to_string(),
                    v.clone(),
                    key.to_string(),
                ),
            };
            let text = format!("[{table}]\n{line}\n");
            let from_file = parse(&text, "n.toml");
            // `set` starts from a profile that already holds the context keys.
            let base = match key {
                "stream.t_index_list" => LoadedProfile::default()
                    .with_set("num_inference_steps", "1000")
                    .unwrap(),
                "stream.num_inference_steps" => LoadedProfile::default()
                    .with_set("t_index_list", "[0]")
                    .unwrap(),
                _ => LoadedProfile::default(),
            };
            let from_set = base.with_set(&set_key, &set_val);
            if ok {
                assert!(from_file.is_ok(), "{key} = {v}: {:?}", from_file.err());
                assert!(from_set.is_ok(), "set {key} {v}: {:?}", from_set.err());
                continue;
            }
            let fe = from_file.expect_err(&format!("{key} = {v} accepted in a profile"));
            let se = from_set.expect_err(&format!("set {key} {v} accepted"));
            let fp = fe
                .problems
                .iter()
                .find(|p| p.key == named)
                .unwrap_or_else(|| panic!("{key} = {v}: {fe}"));
            let sp = se
                .problems
                .iter()
                .find(|p| p.key == named)
                .unwrap_or_else(|| panic!("set {key} {v}: {se}"));
            assert!(fp.at.is_some(), "{key} = {v}: no position: {fe}");
            assert!(fe.to_string().starts_with("n.toml:"), "{fe}");
            assert!(se.to_string().starts_with("<set>: key `"), "{se}");
            if fp.message.contains("out of range") || sp.message.contains("out of range") {
                assert_eq!(fp.message, sp.message, "{key} = {v}");
            }
        }
    }
}

/// Seeded random values for every key through `set` (bounded: 4000 edits): nothing panics,
/// and whatever is accepted is usable by the code that consumes it (frame periods as
/// `Duration`s, the pacing of sources, the cheap transforms, the pre-processing sizes).
#[test]
fn random_values_through_set_never_panic_and_accepted_ones_work() {
    use rand::{Rng, SeedableRng};
    let keys = known_keys();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e7);
    let lp = LoadedProfile::default();
    let mut accepted = 0;
    for _ in 0..4000 {
        let key = &keys[rng.random_range(0..keys.len())];
        let v = match rng.random_range(0..9) {
            0 => format!("{}", rng.random::<i64>()),
            1 => format!("{}", rng.random_range(-3i64..3000)),
            2 => format!(
                "{:e}",
                rng.random::<f64>() * 10f64.powi(rng.random_range(-30..30))
            ),
            3 => ["nan", "inf", "-inf", "-0.0", "1e-20", "0"][rng.random_range(0..6)].into(),
            4 => format!("{}", rng.random_range(-2.0..300.0)),
            5 => format!(
                "[{}]",
                (0..rng.random_range(0..20))
                    .map(|_| rng.random_range(-2i64..1200).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            6 => format!(
                "{{ x = {}, y = {}, width = {}, height = {} }}",
                rng.random_range(-5i64..40000),
                rng.random_range(-5i64..40000),
                rng.random_range(-5i64..40000),
                rng.random_range(-5i64..40000)
            ),
            7 => format!(
                "[{{ id = \"x\", scale = {} }}]",
                rng.random_range(-20.0..20.0)
            ),
            _ => "\"text\"".into(),
        };
        let Ok(next) = lp.with_set(key, &v) else {
            continue;
        };
        accepted += 1;
        let p = &next.profile;
        for fps in [p.source.fps, p.output.fps] {
            let _ = std::time::Duration::from_secs_f64(1.0 / fps);
            let _ = crate::source::pacer::Pacer::new(fps);
        }
        let _ = crate::config::preprocess(p);
        if p.transform != TransformKind::Diffusion {
            let mut t = crate::transform::build(&crate::config::transform_options(p)).unwrap();
            t.apply(&crate::config::transform_options(p)).unwrap();
        }
    }
    assert!(accepted > 100, "{accepted}");
}

#[test]
fn non_regular_huge_and_binary_files_are_refused_by_name() {
    let e = format!(
        "{:#}",
        LoadedProfile::load(Path::new("/dev/zero")).unwrap_err()
    );
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = format!("{:#}", LoadedProfile::load(&fifo).unwrap_err());
    assert!(e.contains("not a regular file"), "{e}");
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    let e = format!("{:#}", LoadedProfile::load(&big).unwrap_err());
    assert!(e.contains("big.toml") && e.contains("larger than"), "{e}");
    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"prompt = \"caf\xe9\"\n").unwrap();
    let e = format!("{:#}", LoadedProfile::load(&latin1).unwrap_err());
    assert!(e.contains("latin1.toml") && e.contains("not UTF-8"), "{e}");
}

fn err(text: &str) -> ProfileError {
    parse(text, "p.toml").unwrap_err()
}

#[test]
fn model_paths_are_relative_to_the_profile_file() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("profiles");
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("p.toml");
    std::fs::write(
        &path,
        "[model]\nid = \"../models/m\"\ntiny_vae = \"madebyollin/taesd\"\n\
         lora = [{ id = \"./l.safetensors\", scale = 0.5 }]\n",
    )
    .unwrap();
    let lp = LoadedProfile::load(&path).unwrap();
    assert_eq!(
        lp.profile.model.id,
        sub.join("../models/m").display().to_string()
    );
    assert_eq!(lp.profile.model.tiny_vae, "madebyollin/taesd");
    assert_eq!(
        lp.profile.model.lora[0].id,
        sub.join("./l.safetensors").display().to_string()
    );
    // Edits keep the resolved paths.
    let next = lp.with_set("prompt", "x").unwrap();
    assert_eq!(next.profile.model.id, lp.profile.model.id);
}

#[test]
fn two_line_profile_uses_defaults() {
    let (p, _) = parse(
        "prompt = \"a cat\"\n[source]\nkind = \"camera\"\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(p.prompt, "a cat");
    assert_eq!(p.source.kind, SourceKind::Camera);
    assert_eq!(p.stream, StreamConfig::default());
    assert_eq!(p.output.label, "sdcam");
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let e = err("prompt = \"x\"\n\n[stream]\nguidance = 2.0\n");
    let s = e.to_string();
    assert_eq!(e.problems[0].at, Some((4, 1)), "{s}");
    assert_eq!(e.problems[0].key, "stream.guidance");
    assert!(
        s.starts_with("p.toml:4:1: key `stream.guidance`: unknown field `guidance`"),
        "{s}"
    );
}

#[test]
fn wrong_type_is_located() {
    let e = err("[output]\nfps = \"fast\"\n");
    assert_eq!(e.problems[0].at.map(|a| a.0), Some(2));
    assert_eq!(e.problems[0].key, "output.fps");
    let e = err("[stream]\ncfg_type = \"sometimes\"\n");
    assert_eq!(e.problems[0].key, "stream.cfg_type");
    assert!(e.to_string().contains("unknown variant `sometimes`"), "{e}");
}

#[test]
fn out_of_range_values_are_all_reported_with_positions() {
    let e =
        err("[stream]\nguidance_scale = 99.0\nt_index_list = [45, 32]\n[output]\nwidth = 1281\n");
    let keys: Vec<_> = e.problems.iter().map(|p| (p.key.as_str(), p.at)).collect();
    assert!(
        keys.contains(&("stream.guidance_scale", Some((2, 18)))),
        "{keys:?}"
    );
    assert!(
        keys.contains(&("stream.t_index_list", Some((3, 16)))),
        "{keys:?}"
    );
    assert!(keys.contains(&("output.width", Some((5, 9)))), "{keys:?}");
    assert!(e
        .to_string()
        .contains("p.toml:2:18: key `stream.guidance_scale`: 99 is out of range"));
}

#[test]
fn stream_sizes_are_auto_by_default_and_bad_ones_are_located() {
    let (p, _) = parse("[stream]\nwidth = \"auto\"\nheight = 384\n", "p.toml").unwrap();
    assert_eq!(
        (p.stream.width, p.stream.height),
        (StreamDim::Auto, StreamDim::Px(384))
    );
    assert_eq!(StreamConfig::default().width, StreamDim::Auto);
    for (value, want) in [
        (
            "\"autp\"",
            "invalid value: string \"autp\", expected a size in pixels",
        ),
        ("\"Auto\"", "or \"auto\""),
        ("-8", "invalid value: integer `-8`"),
        ("0", "0 is out of range (64 to 2048), or \"auto\""),
        ("100", "100 must be a multiple of 8"),
        ("4096", "4096 is out of range (64 to 2048)"),
    ] {
        let e = err(&format!(
            "prompt = \"x\"\n[stream]\nheight = 384\nwidth = {value}\n"
        ));
        let s = e.to_string();
        assert!(
            s.starts_with("p.toml:4:9: key `stream.width`: ") && s.contains(want),
            "{value}: {s}"
        );
    }
    // Live: `set stream.width auto` and back; `get` shows what is written.
    let lp = LoadedProfile::default()
        .with_set("stream.width", "640")
        .unwrap();
    assert_eq!(lp.profile.stream.width, StreamDim::Px(640));
    assert_eq!(lp.get("stream.width").unwrap(), "stream.width = 640");
    let lp = lp.with_set("stream.width", "auto").unwrap();
    assert_eq!(lp.profile.stream.width, StreamDim::Auto);
    assert_eq!(lp.get("stream.height").unwrap(), "stream.height = \"auto\"");
    let e = lp.with_set("stream.width", "aut").unwrap_err().to_string();
    assert!(
        e.contains("<set>: key `stream.width`") && e.contains("\"auto\""),
        "{e}"
    );
    let e = lp.with_set("stream.height", "12").unwrap_err().to_string();
    assert!(
        e.contains("key `stream.height`: 12 is out of range (64 to 2048)"),
        "{e}"
    );
}

/// A megabyte value quoted back by the parser (a wrong type, an unknown variant) is not
/// echoed whole: the error stays a readable line that still names file, line and key.
#[test]
fn errors_never_echo_a_huge_value() {
    let huge = "y".repeat(900_000);
    for text in [
        format!("transform = \"{huge}\"\n"),
        format!("[stream]\nwidth = \"{huge}\"\n"),
        format!("[output]\nkind = \"{huge}\"\n"),
    ] {
        let e = err(&text).to_string();
        assert!(e.len() < 1000, "{} bytes: {}", e.len(), &e[..200]);
        assert!(e.starts_with("p.toml:") && e.contains("more bytes"), "{e}");
    }
    assert_eq!(elide_long_words("short words stay"), "short words stay");
    let w = format!("`{}`,", "z".repeat(200));
    let cut = elide_long_words(&w);
    assert!(
        cut.starts_with("`zzz") && cut.ends_with("zzzzzz`,"),
        "{cut}"
    );
    assert!(cut.contains("(147 more bytes)"), "{cut}");
}

#[test]
fn syntax_errors_have_positions() {
    let e = err("prompt = \"unterminated\n");
    assert_eq!(e.problems[0].at.map(|a| a.0), Some(1));
    assert!(e.to_string().contains("TOML syntax error"), "{e}");
}

#[test]
fn set_changes_a_copy_and_validates() {
    let lp = LoadedProfile::default();
    let next = lp.with_set("guidance_scale", "2.5").unwrap();
    assert_eq!(next.profile.stream.guidance_scale, 2.5);
    assert_eq!(lp.profile.stream.guidance_scale, 1.2);
    let next = next.with_set("prompt", "a cat in a hat").unwrap();
    assert_eq!(next.profile.prompt, "a cat in a hat");
    let next = next.with_set("stream.t_index_list", "[20, 40]").unwrap();
    assert_eq!(next.profile.stream.t_index_list, vec![20, 40]);
    let e = lp.with_set("guidance_scale", "-1").unwrap_err();
    assert!(e.to_string().contains("stream.guidance_scale"), "{e}");
    // Rates that passed before and then panicked (a Duration from 1e-20 fps) or stalled
    // stop for a whole period (0.02 fps = 50 s).
    for (key, v) in [
        ("output.fps", "1e-20"),
        ("source.fps", "0.02"),
        ("output.fps", "inf"),
    ] {
        let e = lp.with_set(key, v).unwrap_err();
        assert!(
            format!("{e:#}").contains("out of range"),
            "{key}={v}: {e:#}"
        );
    }
    let e = lp.with_set("no_such_key", "1").unwrap_err();
    assert!(e.to_string().contains("unknown key `no_such_key`"), "{e}");
    let e = lp.with_set("width", "1").unwrap_err();
    assert!(e.to_string().contains("ambiguous"), "{e}");
    let e = lp.with_set("stream.seed", "many").unwrap_err();
    assert!(e.to_string().contains("stream.seed"), "{e}");
}

#[test]
fn reload_keeps_overrides_and_failures_keep_old() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "prompt = \"one\"\n").unwrap();
    let lp = LoadedProfile::load(&path).unwrap();
    let lp = lp
        .with_override("output.fps", toml::Value::Float(15.0))
        .unwrap();
    std::fs::write(&path, "prompt = \"two\"\n").unwrap();
    let next = lp.reload(None).unwrap();
    assert_eq!(
        (next.profile.prompt.as_str(), next.profile.output.fps),
        ("two", 15.0)
    );
    std::fs::write(&path, "prompt = 3\n").unwrap();
    let e = next.reload(None).unwrap_err();
    assert!(
        format!("{e:#}").contains("p.toml:1:10: key `prompt`"),
        "{e:#}"
    );
    assert_eq!(next.profile.prompt, "two");
}

#[test]
fn shipped_profiles_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            LoadedProfile::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
            n += 1;
        }
    }
    assert!(n >= 4, "expected demo, anime and more profiles, found {n}");
}
