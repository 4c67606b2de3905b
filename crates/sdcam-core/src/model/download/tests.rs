//! File selection on the real hub file lists (`tests/data/hub-configs/*/FILES.txt`), and the
//! download against an in-process fake hub on 127.0.0.1 (std `TcpListener`: it must be able to
//! drop a connection mid-body, which a ready-made test server does not offer).
//!
//! Over 700 lines because it is tables of cases over the real file lists plus one fake-hub
//! harness; splitting it would scatter the cases from the harness they share.

use super::*;
use crate::model::sd::{ModelSpec, StableDiffusion};
use crate::model::testutil::fixture;
use candle_core::Device;
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------------
// The real file lists.

fn hub_configs() -> PathBuf {
    PathBuf::from(crate::REPO_DIR).join("tests/data/hub-configs")
}

/// Parses a `FILES.txt`: `path [size [unit]] [(comment)]`; sizes in bytes or as the hub pages
/// show them (`1.73 GB`, decimal); lines that are not one file (comments, `images/`,
/// `README.md, images, …`) are skipped.
fn real_list(repo: &str) -> Vec<RemoteFile> {
    let path = hub_configs().join(repo).join("FILES.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let name = words.next().unwrap();
        if name.ends_with('/') || name.ends_with(',') {
            continue;
        }
        let size = words.next().and_then(|n| n.parse::<f64>().ok()).map(|n| {
            let mult = match words.next() {
                Some("kB") => 1e3,
                Some("MB") => 1e6,
                Some("GB") => 1e9,
                _ => 1.0,
            };
            (n * mult).round() as u64
        });
        out.push(RemoteFile::new(name, size));
    }
    assert!(out.len() >= 4, "{}: {out:?}", path.display());
    out
}

fn paths(sel: &[Selected]) -> Vec<&str> {
    let mut v: Vec<&str> = sel.iter().map(|s| s.path.as_str()).collect();
    v.sort();
    v
}

fn select(repo: &str, want: Want, half: bool) -> Vec<Selected> {
    let sel = select_files(&real_list(repo), &want, half, &HashSet::new())
        .unwrap_or_else(|e| panic!("{repo} {want:?} half={half}: {e:#}"));
    never_unneeded(repo, &sel, &want);
    sel
}

/// What a selection must never contain, whatever the repo.
fn never_unneeded(repo: &str, sel: &[Selected], want: &Want) {
    for s in sel {
        let p = s.path.as_str();
        for bad in [".bin", ".onnx", ".onnx_data", ".ckpt", ".pth", ".yaml"] {
            assert!(!p.ends_with(bad), "{repo}: {p}");
        }
        for bad in [
            "safety_checker/",
            "feature_extractor/",
            "non_ema",
            "_2/",
            "vae_encoder/",
            "vae_decoder/",
        ] {
            assert!(!p.contains(bad), "{repo}: {p}");
        }
        if !p.contains('/') {
            let ok: &[&str] = match want {
                Want::Pipeline { .. } => &["model_index.json", RANDOM_WEIGHTS_MARKER],
                Want::Single => &["config.json", "diffusion_pytorch_model.safetensors"],
                Want::File(_) => &[],
            };
            assert!(
                ok.contains(&p)
                    || (matches!(want, Want::Single)
                        && p == "diffusion_pytorch_model.fp16.safetensors"),
                "{repo}: root file {p}"
            );
        }
    }
}

const SD_TOKENIZER: [&str; 4] = [
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
];

fn expect_pipeline(variant: &str, vae_weights: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
    ]
    .iter()
    .chain(SD_TOKENIZER.iter())
    .map(|s| s.to_string())
    .collect();
    v.push(format!("text_encoder/model{variant}.safetensors"));
    v.push(format!("unet/diffusion_pytorch_model{variant}.safetensors"));
    if vae_weights {
        v.push(format!("vae/diffusion_pytorch_model{variant}.safetensors"));
    }
    v.sort();
    v
}

#[test]
fn sd_turbo_selection() {
    let repo = "stabilityai--sd-turbo";
    let gpu = select(repo, Want::Pipeline { kl_vae: true }, true);
    assert_eq!(paths(&gpu), expect_pipeline(".fp16", true));
    // 1.73 GB + 681 MB + 167 MB as the hub page shows them, plus the small files it sizes.
    let gb = bytes_to_fetch(&gpu) as f64 / 1e9;
    assert!((2.578..2.581).contains(&gb), "{gb}");
    assert_eq!(unknown_sizes(&gpu), 2); // vocab.json and merges.txt are listed without size
    let cpu = select(repo, Want::Pipeline { kl_vae: true }, false);
    assert_eq!(paths(&cpu), expect_pipeline("", true));
    // With a tiny VAE: the KL VAE's config only.
    let tiny = select(repo, Want::Pipeline { kl_vae: false }, true);
    assert_eq!(paths(&tiny), expect_pipeline(".fp16", false));
    assert!(paths(&tiny).contains(&"vae/config.json"));
    assert!(!paths(&gpu).contains(&"sd_turbo.safetensors"));
}

#[test]
fn sd15_selection_exact_bytes() {
    let repo = "runwayml--stable-diffusion-v1-5";
    let small = 541 + 308 + 617 + 524619 + 472 + 806 + 1059962 + 743 + 547;
    let gpu = select(repo, Want::Pipeline { kl_vae: true }, true);
    assert_eq!(paths(&gpu), expect_pipeline(".fp16", true));
    assert_eq!(
        bytes_to_fetch(&gpu),
        small + 246144864 + 1719125304 + 167335342
    );
    assert_eq!(unknown_sizes(&gpu), 0);
    let cpu = select(repo, Want::Pipeline { kl_vae: true }, false);
    assert_eq!(paths(&cpu), expect_pipeline("", true));
    assert_eq!(
        bytes_to_fetch(&cpu),
        small + 492265874 + 3438167540 + 334643276
    );
    let tiny = select(repo, Want::Pipeline { kl_vae: false }, true);
    assert_eq!(bytes_to_fetch(&tiny), small + 246144864 + 1719125304);
}

#[test]
fn sdxl_turbo_selection_and_refusal() {
    let repo = "stabilityai--sdxl-turbo";
    // The selection itself skips what SD 1.x/2.x has no use for (second encoder, ONNX, root
    // checkpoints) …
    let gpu = select(repo, Want::Pipeline { kl_vae: true }, true);
    assert_eq!(paths(&gpu), expect_pipeline(".fp16", true));
    // … and planning refuses the repo from its model_index.json before any weight is fetched.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(hub_configs().join(repo).join("model_index.json")).unwrap(),
    )
    .unwrap();
    let e = hub::check_model_index(&index, Path::new("model_index.json")).unwrap_err();
    assert!(
        format!("{e:#}").contains("StableDiffusionXLPipeline"),
        "{e:#}"
    );
}

#[test]
fn tiny_vae_and_controlnet_selection() {
    for repo in ["madebyollin--taesd", "madebyollin--taesdxl"] {
        for half in [true, false] {
            // No fp16 variant: the plain file on a GPU too; never the standalone
            // encoder/decoder files or the .bin.
            let s = select(repo, Want::Single, half);
            assert_eq!(
                paths(&s),
                ["config.json", "diffusion_pytorch_model.safetensors"],
                "{repo}"
            );
            assert_eq!(bytes_to_fetch(&s), 597 + 9793292);
        }
    }
    let repo = "lllyasviel--control_v11p_sd15_canny";
    let gpu = select(repo, Want::Single, true);
    assert_eq!(
        paths(&gpu),
        ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    );
    let cpu = select(repo, Want::Single, false);
    assert_eq!(
        paths(&cpu),
        ["config.json", "diffusion_pytorch_model.safetensors"]
    );
    assert_eq!(unknown_sizes(&cpu), 1);
    // A TAESD repo is not a pipeline.
    let e = select_files(
        &real_list("madebyollin--taesd"),
        &Want::Pipeline { kl_vae: true },
        true,
        &HashSet::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("model_index.json"), "{e}");
}

#[test]
fn cached_variant_wins_and_is_not_fetched() {
    let repo = "stabilityai--sd-turbo";
    let files = real_list(repo);
    // A plain unet downloaded earlier (e.g. by Python) serves an f16 run: nothing to fetch
    // for the unet, the other components in fp16.
    let cached: HashSet<String> = [
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "model_index.json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sel = select_files(&files, &Want::Pipeline { kl_vae: true }, true, &cached).unwrap();
    let p = paths(&sel);
    assert!(p.contains(&"unet/diffusion_pytorch_model.safetensors"));
    assert!(!p.contains(&"unet/diffusion_pytorch_model.fp16.safetensors"));
    assert!(p.contains(&"text_encoder/model.fp16.safetensors"));
    let gb = bytes_to_fetch(&sel) as f64 / 1e9;
    assert!((0.84..0.85).contains(&gb), "{gb}");
    assert_eq!(sel.iter().filter(|s| s.cached).count(), 3);
}

#[test]
fn sharded_bin_only_and_lora_lists() {
    let f = |p: &str| RemoteFile::new(p, Some(10));
    let list = vec![
        f("config.json"),
        f("diffusion_pytorch_model.safetensors.index.json"),
        f("diffusion_pytorch_model-00001-of-00002.safetensors"),
        f("diffusion_pytorch_model-00002-of-00002.safetensors"),
        f("diffusion_pytorch_model.safetensors.index.fp16.json"),
        f("diffusion_pytorch_model.fp16-00001-of-00002.safetensors"),
        f("diffusion_pytorch_model.fp16-00002-of-00002.safetensors"),
        f("diffusion_pytorch_model-00001-of-00002.bin"),
    ];
    let none = HashSet::new();
    let s = select_files(&list, &Want::Single, true, &none).unwrap();
    assert_eq!(
        paths(&s),
        [
            "config.json",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
        ]
    );
    let s = select_files(&list, &Want::Single, false, &none).unwrap();
    assert_eq!(
        paths(&s),
        [
            "config.json",
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        ]
    );
    assert!(is_shard("model-00001-of-00012.safetensors", "model"));
    assert!(!is_shard("model.fp16-00001-of-00012.safetensors", "model"));
    assert!(!is_shard("model-1-of-.safetensors", "model"));

    let bin_only = vec![f("config.json"), f("diffusion_pytorch_model.bin")];
    let e = select_files(&bin_only, &Want::Single, true, &none).unwrap_err();
    assert!(e.to_string().contains("only PyTorch .bin"), "{e}");

    let lora = vec![
        f("README.md"),
        f("pytorch_lora_weights.safetensors"),
        f("image.png"),
    ];
    let want = Want::File(hub::LORA_WEIGHT_NAME.to_string());
    let s = select_files(&lora, &want, true, &none).unwrap();
    assert_eq!(paths(&s), [hub::LORA_WEIGHT_NAME]);
    let e = select_files(&[f("pytorch_lora_weights.bin")], &want, true, &none).unwrap_err();
    assert!(
        e.to_string().contains("only pytorch_lora_weights.bin"),
        "{e}"
    );
}

#[test]
fn disk_space_check() {
    check_disk_space(10, 10, Path::new("/c")).unwrap();
    let e = check_disk_space(2_600_000_000, 1_000_000_000, Path::new("/c")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("2.60 GB") && msg.contains("1.00 GB"), "{msg}");
    assert!(msg.contains("HF_HUB_CACHE"), "{msg}");
    assert!(free_space(Path::new("/definitely/not/here")).unwrap() > 0);
}

// ---------------------------------------------------------------------------------------------
// A fake hub on 127.0.0.1.

#[derive(Clone)]
struct FakeFile {
    path: String,
    data: Vec<u8>,
    lfs: bool,
    /// An LFS etag that is not the data's sha256 (corruption test).
    wrong_sha: bool,
}

impl FakeFile {
    fn sha256(&self) -> String {
        if self.wrong_sha {
            return "0".repeat(64);
        }
        Sha256::digest(&self.data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
    /// A stand-in for the git blob id of a small file.
    fn blob_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"blob");
        h.update(&self.data);
        h.finalize()[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

struct FakeRepo {
    id: String,
    commit: String,
    files: Vec<FakeFile>,
}

#[derive(Debug, Clone)]
struct Logged {
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct State {
    repos: Vec<FakeRepo>,
    log: Vec<Logged>,
    /// Drop the connection of the next CDN download of this sha256 after this many bytes.
    drop_after: Option<(String, usize)>,
}

struct FakeHub {
    url: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// The hub and its "CDN" (where LFS downloads are redirected) listen on two ports of
    /// 127.0.0.1, so the CDN is another origin, as on the real hub.
    fn start(repos: Vec<FakeRepo>) -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        for listener in [hub, cdn] {
            let (st, base) = (state.clone(), cdn_url.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (st, base) = (st.clone(), base.clone());
                    std::thread::spawn(move || {
                        let _ = serve(conn, &st, &base);
                    });
                }
            });
        }
        Self { url, state }
    }

    fn opts(&self, cache: &Path) -> HubOptions {
        HubOptions {
            cache_dir: cache.to_path_buf(),
            offline: false,
            token: Some("hf_test".into()),
            endpoint: Some(self.url.clone()),
            progress: false,
        }
    }

    fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

fn respond(
    conn: &mut TcpStream,
    code: u16,
    headers: &[(&str, String)],
    body: &[u8],
    content_length: usize,
) -> std::io::Result<()> {
    let mut head =
        format!("HTTP/1.1 {code} X\r\nConnection: close\r\nContent-Length: {content_length}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

fn not_found(conn: &mut TcpStream, code: &str) -> std::io::Result<()> {
    respond(conn, 404, &[("X-Error-Code", code.to_string())], b"", 0)
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, base: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let head = method == "HEAD";
    let mut st = state.lock().unwrap();
    st.log.push(Logged {
        method: method.clone(),
        path: target.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    });
    if let Some(rest) = target.strip_prefix("/api/models/") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        assert_eq!(query, "blobs=true");
        let Some((id, _rev)) = path.split_once("/revision/") else {
            return not_found(&mut conn, "RepoNotFound");
        };
        let Some(repo) = st.repos.iter().find(|r| r.id == id) else {
            return not_found(&mut conn, "RepoNotFound");
        };
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({
                    "rfilename": f.path, "size": f.data.len(), "blobId": f.blob_id()
                });
                if f.lfs {
                    s["lfs"] = serde_json::json!({
                        "sha256": f.sha256(), "size": f.data.len(), "pointerSize": 134
                    });
                }
                s
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "id": repo.id, "sha": repo.commit, "siblings": siblings
        }))
        .unwrap();
        return respond(&mut conn, 200, &[], &body, body.len());
    }
    if let Some(sha) = target.strip_prefix("/cdn/") {
        let file = st
            .repos
            .iter()
            .flat_map(|r| r.files.iter())
            .find(|f| f.lfs && f.sha256() == sha)
            .cloned();
        let Some(file) = file else {
            return not_found(&mut conn, "EntryNotFound");
        };
        let start = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .map(|s| s.parse::<usize>().unwrap())
            .unwrap_or(0);
        let drop_at = match &st.drop_after {
            Some((s, n)) if s == sha => {
                let n = *n;
                st.drop_after = None;
                Some(n)
            }
            _ => None,
        };
        drop(st);
        let len = file.data.len();
        let body = &file.data[start..];
        let (code, hdrs) = if start > 0 {
            (
                206,
                vec![("Content-Range", format!("bytes {start}-{}/{len}", len - 1))],
            )
        } else {
            (200, vec![])
        };
        return match drop_at {
            Some(n) => {
                respond(&mut conn, code, &hdrs, &body[..n], body.len())?;
                conn.shutdown(std::net::Shutdown::Both)
            }
            None => respond(&mut conn, code, &hdrs, body, body.len()),
        };
    }
    // /{org}/{name}/resolve/{rev}/{path}
    let segs: Vec<&str> = target.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() != 5 || segs[2] != "resolve" {
        return not_found(&mut conn, "RepoNotFound");
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let Some(repo) = st.repos.iter().find(|r| r.id == id) else {
        return not_found(&mut conn, "RepoNotFound");
    };
    if segs[3] != "main" && segs[3] != repo.commit {
        return not_found(&mut conn, "RevisionNotFound");
    }
    let Some(file) = repo.files.iter().find(|f| f.path == segs[4]) else {
        return not_found(&mut conn, "EntryNotFound");
    };
    let commit = ("X-Repo-Commit", repo.commit.clone());
    if file.lfs {
        let sha = file.sha256();
        let hdrs = [
            commit,
            ("X-Linked-Etag", format!("\"{sha}\"")),
            ("X-Linked-Size", file.data.len().to_string()),
            ("ETag", "\"not-the-blob-name\"".to_string()),
            ("Location", format!("{base}/cdn/{sha}")),
        ];
        respond(&mut conn, 302, &hdrs, b"", 0)
    } else {
        let hdrs = [commit, ("ETag", format!("W/\"{}\"", file.blob_id()))];
        let data = file.data.clone();
        drop(st);
        let body: &[u8] = if head { b"" } else { &data };
        respond(&mut conn, 200, &hdrs, body, data.len())
    }
}

/// `tests/fixtures/models/tiny-sd21` as a hub repo, with fp16-named copies of the weights and
/// the files a real repo has that sdcam must never fetch.
fn tiny_repo(id: &str) -> FakeRepo {
    let root = fixture("models/tiny-sd21");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&root).unwrap().to_str().unwrap().to_string();
            let data = std::fs::read(&p).unwrap();
            let lfs = rel.ends_with(".safetensors");
            if lfs {
                files.push(FakeFile {
                    path: rel.replace(".safetensors", ".fp16.safetensors"),
                    data: [data.clone(), vec![0]].concat(), // a different blob
                    lfs,
                    wrong_sha: false,
                });
            }
            files.push(FakeFile {
                path: rel,
                data,
                lfs,
                wrong_sha: false,
            });
        }
    }
    for decoy in [
        "sd_turbo.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/model.onnx",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    ] {
        files.push(FakeFile {
            path: decoy.into(),
            data: vec![7; 1000],
            lfs: !decoy.ends_with(".json"),
            wrong_sha: false,
        });
    }
    FakeRepo {
        id: id.into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        files,
    }
}

fn spec(id: &str) -> ModelSpec {
    ModelSpec {
        id: id.into(),
        revision: None,
        tiny_vae: None,
        loras: vec![],
        dtype: DType::F32,
    }
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn downloads_into_the_python_cache_layout_and_loads() {
    let id = "sdcam-test/tiny-sd21";
    let hub = FakeHub::start(vec![tiny_repo(id)]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let opts = hub.opts(&cache);
    let model = StableDiffusion::load(&spec(id), &Device::Cpu, &opts).unwrap();
    assert!(model.description.contains("RANDOM WEIGHTS"));

    let log = hub.log();
    for l in &log {
        for bad in [
            "sd_turbo",
            ".bin",
            ".onnx",
            "safety_checker",
            "feature_extractor",
            ".fp16.",
        ] {
            assert!(!l.path.contains(bad), "fetched {l:?}");
        }
        // The token goes to the hub, never to the CDN.
        assert_eq!(l.auth.is_some(), !l.path.starts_with("/cdn/"), "{l:?}");
    }
    let repo = RepoCache::new(&cache, id);
    let commit = &tiny_repo(id).commit;
    assert_eq!(
        std::fs::read_to_string(repo.dir().join("refs/main")).unwrap(),
        *commit
    );
    let unet = repo
        .pointer(commit, "unet/diffusion_pytorch_model.safetensors")
        .unwrap();
    let target = std::fs::read_link(&unet).unwrap();
    let data = std::fs::read(fixture(
        "models/tiny-sd21/unet/diffusion_pytorch_model.safetensors",
    ))
    .unwrap();
    let sha: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(target, PathBuf::from(format!("../../../blobs/{sha}")));
    assert_eq!(std::fs::read(&unet).unwrap(), data);
    let index = repo.pointer(commit, "model_index.json").unwrap();
    assert_eq!(
        std::fs::read_link(&index).unwrap().parent().unwrap(),
        Path::new("../../blobs")
    );
    // Every file sdcam reads, nothing else; no partial files left.
    let mut snap: Vec<String> = all_files(&repo.dir().join("snapshots").join(commit))
        .iter()
        .map(|p| {
            p.strip_prefix(repo.dir().join("snapshots").join(commit))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    snap.sort();
    let mut want = expect_pipeline("", true);
    want.push(RANDOM_WEIGHTS_MARKER.into());
    want.sort();
    assert_eq!(snap, want);
    assert!(!all_files(&cache)
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".incomplete")));
    assert!(cache.join(".locks").join(repo.folder()).is_dir());

    // Cache-first: a second load does not touch the network; offline loads too.
    hub.clear_log();
    StableDiffusion::load(&spec(id), &Device::Cpu, &opts).unwrap();
    assert!(hub.log().is_empty(), "{:?}", hub.log());
    let off = HubOptions {
        offline: true,
        ..opts.clone()
    };
    StableDiffusion::load(&spec(id), &Device::Cpu, &off).unwrap();

    // f16 later: only the fp16 variants are planned… but the cache-first rule keeps the f32
    // files already there (the loader converts), so nothing is fetched either.
    let mut s16 = spec(id);
    s16.dtype = DType::F16;
    prefetch(&pipeline_requests(id, None, None, &[]), s16.dtype, &opts).unwrap();
    assert!(hub.log().is_empty(), "{:?}", hub.log());
}

#[test]
fn f16_plan_fetches_the_fp16_variant_and_tiny_vae_skips_vae_weights() {
    let id = "sdcam-test/tiny-sd21";
    let hub = FakeHub::start(vec![tiny_repo(id)]);
    let tmp = tempfile::tempdir().unwrap();
    let opts = hub.opts(tmp.path());
    let reqs = pipeline_requests(id, None, Some("sdcam-test/no-such-taesd"), &[]);
    // The tiny VAE repo does not exist: a clear error, nothing downloaded.
    let e = prefetch(&reqs, DType::F16, &opts).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("repo not found") && msg.contains("no-such-taesd"),
        "{msg}"
    );
    hub.clear_log();
    prefetch(&reqs[..1], DType::F16, &opts).unwrap();
    let gets: Vec<String> = hub
        .log()
        .iter()
        .filter(|l| l.method == "HEAD")
        .map(|l| l.path.clone())
        .collect();
    assert!(gets
        .iter()
        .any(|p| p.ends_with("unet/diffusion_pytorch_model.fp16.safetensors")));
    assert!(
        !gets
            .iter()
            .any(|p| p.contains("vae/diffusion_pytorch_model")),
        "{gets:?}"
    );
    assert!(gets.iter().any(|p| p.ends_with("vae/config.json")));
    let files = hub::resolve_model_for(
        id,
        None,
        DType::F16,
        &HubOptions {
            offline: true,
            ..opts.clone()
        },
        false,
    )
    .unwrap();
    assert!(files.unet.fp16_variant && files.vae.weights.is_empty());
}

#[test]
fn interrupted_download_resumes_with_a_range_request() {
    let id = "sdcam-test/big-lora";
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let lfs = FakeFile {
        path: hub::LORA_WEIGHT_NAME.into(),
        data: data.clone(),
        lfs: true,
        wrong_sha: false,
    };
    let sha = lfs.sha256();
    let hub = FakeHub::start(vec![FakeRepo {
        id: id.into(),
        commit: "1111111111111111111111111111111111111111".into(),
        files: vec![lfs],
    }]);
    let tmp = tempfile::tempdir().unwrap();
    let opts = hub.opts(tmp.path());
    let reqs = pipeline_requests("./no-model-here", None, None, &[id.to_string()]);
    assert_eq!(reqs.len(), 2);
    let reqs = &reqs[1..];

    // Run 1: the connection drops after 1 MB and no retry is allowed: an error that says the
    // partial file is kept.
    hub.state.lock().unwrap().drop_after = Some((sha.clone(), 1_000_000));
    let mut client = Client::new(&opts);
    client.retries = 0;
    let e = prefetch_with(reqs, DType::F32, &opts, &free_space, &mut client).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("connection lost") && msg.contains("resumes"),
        "{msg}"
    );
    let repo = RepoCache::new(tmp.path(), id);
    let partial = std::fs::metadata(repo.incomplete(&sha)).unwrap().len();
    assert!(partial > 0 && partial <= 1_000_000, "{partial}");
    assert!(!repo.blob(&sha).exists());

    // Run 2: only the remaining bytes are requested.
    hub.clear_log();
    prefetch_with(reqs, DType::F32, &opts, &free_space, &mut client).unwrap();
    let cdn: Vec<Logged> = hub
        .log()
        .into_iter()
        .filter(|l| l.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(cdn.len(), 1, "{cdn:?}");
    assert_eq!(cdn[0].range.as_deref(), Some(&*format!("bytes={partial}-")));
    assert_eq!(std::fs::read(repo.blob(&sha)).unwrap(), data);
    assert!(!repo.incomplete(&sha).exists());
    let path = hub::resolve_lora(
        id,
        None,
        None,
        &HubOptions {
            offline: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data);

    // Within one run, a dropped connection is resumed right away.
    let tmp2 = tempfile::tempdir().unwrap();
    let opts2 = hub.opts(tmp2.path());
    hub.state.lock().unwrap().drop_after = Some((sha.clone(), 2_000_000));
    hub.clear_log();
    prefetch(reqs, DType::F32, &opts2).unwrap();
    let ranges: Vec<Option<String>> = hub
        .log()
        .into_iter()
        .filter(|l| l.path.starts_with("/cdn/"))
        .map(|l| l.range)
        .collect();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert!(ranges[0].is_none());
    assert!(ranges[1]
        .as_deref()
        .is_some_and(|r| r.starts_with("bytes=")));
    assert_eq!(
        std::fs::read(RepoCache::new(tmp2.path(), id).blob(&sha)).unwrap(),
        data
    );
}

#[test]
fn not_enough_disk_refuses_before_writing() {
    let id = "sdcam-test/tiny-sd21";
    let hub = FakeHub::start(vec![tiny_repo(id)]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let opts = hub.opts(&cache);
    let reqs = pipeline_requests(id, None, None, &[]);
    let e = prefetch_with(
        &reqs,
        DType::F32,
        &opts,
        &|_| Ok(1000),
        &mut Client::new(&opts),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("not enough disk space") && msg.contains("1.00 kB"),
        "{msg}"
    );
    assert!(msg.contains(&cache.display().to_string()), "{msg}");
    assert!(
        all_files(tmp.path()).is_empty(),
        "{:?}",
        all_files(tmp.path())
    );
    // Only the listing and model_index.json (read into memory) were asked for.
    for l in hub.log() {
        assert!(
            l.path.starts_with("/api/") || l.path.ends_with("/model_index.json"),
            "{l:?}"
        );
    }
}

#[test]
fn offline_never_touches_the_network() {
    let id = "sdcam-test/tiny-sd21";
    let hub = FakeHub::start(vec![tiny_repo(id)]);
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        offline: true,
        ..hub.opts(tmp.path())
    };
    let e = StableDiffusion::load(&spec(id), &Device::Cpu, &opts).unwrap_err();
    assert!(format!("{e:#}").contains("HF_HUB_OFFLINE=1"), "{e:#}");
    prefetch(&pipeline_requests(id, None, None, &[]), DType::F32, &opts).unwrap();
    assert!(hub.log().is_empty(), "{:?}", hub.log());
    assert!(all_files(tmp.path()).is_empty());
    // Online with nothing listening: a clear network error with what to do.
    let dead = HubOptions {
        offline: false,
        endpoint: Some("http://127.0.0.1:1".into()),
        ..opts
    };
    let e = prefetch(&pipeline_requests(id, None, None, &[]), DType::F32, &dead).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("cannot reach http://127.0.0.1:1"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE=1"), "{msg}");
}

#[test]
fn corrupted_data_is_refused() {
    let id = "sdcam-test/bad-lora";
    let hub = FakeHub::start(vec![FakeRepo {
        id: id.into(),
        commit: "2222222222222222222222222222222222222222".into(),
        files: vec![FakeFile {
            path: hub::LORA_WEIGHT_NAME.into(),
            data: vec![1; 5000],
            lfs: true,
            wrong_sha: true,
        }],
    }]);
    let tmp = tempfile::tempdir().unwrap();
    let opts = hub.opts(tmp.path());
    // The CDN answers by sha, so serve the wrong-sha file there too: it is found by its
    // (wrong) name, and its bytes do not hash to it.
    let e = prefetch(
        &pipeline_requests("./nothing", None, None, &[id.to_string()])[1..],
        DType::F32,
        &opts,
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("sha256"), "{msg}");
    assert!(!all_files(tmp.path())
        .iter()
        .any(|p| p.to_string_lossy().contains("blobs/")));
}

/// Names from a hub's answers or an index file never reach outside the repo's folder.
#[test]
fn hostile_commits_paths_and_revisions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RepoCache {
        cache_dir: tmp.path().to_path_buf(),
        id: "evil/repo".into(),
    };
    let commit = "0123456789abcdef0123456789abcdef01234567";
    assert!(repo.pointer(commit, "unet/config.json").is_ok());
    for c in [
        "../../../../tmp/x",
        "main",
        "",
        "0123456789abcdef0123456789abcdef0123456/",
    ] {
        assert!(repo.pointer(c, "unet/config.json").is_err(), "commit {c:?}");
    }
    for f in [
        "../x",
        "unet/../../x",
        "/etc/passwd",
        "a//b",
        "./a",
        "a\\..\\b",
        "",
    ] {
        let e = format!("{:#}", repo.pointer(commit, f).unwrap_err());
        assert!(e.contains("not a plain relative path"), "{f:?}: {e}");
    }
    assert!(repo.write_ref("../../escape", commit).is_err());
    assert!(repo.write_ref("refs/pr/2", commit).is_ok());
    // Nothing was created outside the cache folder.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}
