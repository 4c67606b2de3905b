//! The hub's HTTP protocol: listing a repo with sizes, resolving a file's commit and etag,
//! fetching it resumably into the cache (`Range` on `blobs/<etag>.incomplete`, the name
//! `huggingface_hub` uses) under the blob's `flock`, and checking its size and sha256.

use super::*;

/// Characters escaped in one URL path segment (what Python's `quote(s, safe="")` leaves is
/// unreserved: letters, digits, `-._~`).
pub(super) const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(super) fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// What the hub says about a file (the headers `huggingface_hub` reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileMeta {
    commit: String,
    etag: String,
    size: u64,
    /// Where the bytes are (the CDN for LFS files), absolute.
    location: String,
}

#[derive(Deserialize)]
pub(super) struct ApiInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<ApiSibling>,
}

#[derive(Deserialize)]
pub(super) struct ApiSibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
pub(super) struct ApiLfs {
    sha256: String,
    size: u64,
}

/// HTTP access to one hub endpoint.
pub(crate) struct Client {
    /// Never follows redirects itself (the hub's `Location` and `X-Linked-*` headers of an
    /// LFS file are on its 302).
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    /// Reconnections after a dropped connection, per file.
    pub(crate) retries: u32,
}

pub(super) fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

pub(super) fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

pub(super) fn status_error(
    code: u16,
    resp: ureq::Response,
    what: &str,
    has_token: bool,
) -> anyhow::Error {
    let hub_code = resp.header("X-Error-Code").map(str::to_string);
    let hub_msg = resp.header("X-Error-Message").map(str::to_string);
    let detail = match (code, hub_code.as_deref()) {
        (401 | 403, _) if has_token => {
            "access denied: the token (HF_TOKEN) has no access to this repo (gated: accept its \
             conditions on its hub page)"
                .to_string()
        }
        (401 | 403, _) => "access denied: the repo is gated or private; set HF_TOKEN".to_string(),
        (_, Some("RepoNotFound")) => "repo not found".to_string(),
        (_, Some("RevisionNotFound")) => "revision not found".to_string(),
        (_, Some("EntryNotFound")) => "file not found in the repo".to_string(),
        (404, _) => "not found".to_string(),
        _ => String::new(),
    };
    let mut msg = format!("{what}: HTTP {code}");
    if !detail.is_empty() {
        msg.push_str(&format!(" ({detail})"));
    }
    if let Some(m) = hub_msg {
        msg.push_str(&format!(": {m}"));
    }
    anyhow!(msg)
}

impl Client {
    pub(crate) fn new(opts: &HubOptions) -> Self {
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("sdcam/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent,
            endpoint: opts
                .endpoint
                .clone()
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token: opts.token.clone(),
            retries: 3,
        }
    }

    /// A request with the token, sent only to the hub endpoint itself (never to the CDN a
    /// download is redirected to).
    pub(super) fn request(&self, method: &str, url: &str) -> ureq::Request {
        let mut r = self
            .agent
            .request(method, url)
            .set("Accept-Encoding", "identity");
        if let Some(t) = &self.token {
            if origin(url) == origin(&self.endpoint) {
                r = r.set("Authorization", &format!("Bearer {t}"));
            }
        }
        r
    }

    pub(super) fn call(&self, req: ureq::Request, what: &str) -> Result<ureq::Response> {
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, resp)) => {
                Err(status_error(code, resp, what, self.token.is_some()))
            }
            Err(ureq::Error::Transport(t)) => {
                Err(anyhow!("{what}: cannot reach {}: {t}", self.endpoint))
            }
        }
    }

    /// The repo's files with sizes at `revision`.
    pub(crate) fn listing(&self, id: &str, revision: &str) -> Result<Listing> {
        let url = format!(
            "{}/api/models/{id}/revision/{}?blobs=true",
            self.endpoint,
            utf8_percent_encode(revision, SEGMENT)
        );
        let what = format!("listing the files of {id} (revision {revision})");
        let resp = self.call(self.request("GET", &url), &what)?;
        let info: ApiInfo = resp
            .into_json()
            .with_context(|| format!("{what}: unexpected answer from {url}"))?;
        let commit = info
            .sha
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{what}: the answer has no commit (sha)"))?;
        let files = info
            .siblings
            .into_iter()
            .map(|s| RemoteFile {
                path: s.rfilename,
                size: s.lfs.as_ref().map(|l| l.size).or(s.size),
                sha256: s.lfs.map(|l| l.sha256),
                blob_id: s.blob_id,
            })
            .collect();
        Ok(Listing { commit, files })
    }

    pub(super) fn resolve_url(&self, id: &str, revision: &str, file: &str) -> String {
        format!(
            "{}/{id}/resolve/{}/{}",
            self.endpoint,
            utf8_percent_encode(revision, SEGMENT),
            encode_path(file)
        )
    }

    /// Small files read into memory (model_index.json before planning).
    pub(super) fn get_bytes(
        &self,
        id: &str,
        revision: &str,
        file: &str,
        limit: u64,
    ) -> Result<Vec<u8>> {
        let what = format!("downloading {file} of {id} (revision {revision})");
        let mut url = self.resolve_url(id, revision, file);
        for _ in 0..5 {
            let resp = self.call(self.request("GET", &url), &what)?;
            if (300..400).contains(&resp.status()) {
                let loc = resp
                    .header("Location")
                    .with_context(|| format!("{what}: redirect without Location"))?;
                url = if loc.starts_with('/') {
                    format!("{}{loc}", origin(&url))
                } else {
                    loc.to_string()
                };
                continue;
            }
            let mut buf = Vec::new();
            resp.into_reader()
                .take(limit)
                .read_to_end(&mut buf)
                .with_context(|| format!("{what}: reading the answer"))?;
            return Ok(buf);
        }
        bail!("{what}: too many redirects")
    }

    /// `HEAD` on the resolve URL, following only relative redirects (a renamed repo), as
    /// `huggingface_hub.get_hf_file_metadata` does.
    pub(super) fn metadata(&self, id: &str, revision: &str, file: &str) -> Result<FileMeta> {
        let what = format!("looking up {file} of {id} (revision {revision})");
        let mut url = self.resolve_url(id, revision, file);
        for _ in 0..5 {
            let resp = self.call(self.request("HEAD", &url), &what)?;
            let location = resp.header("Location").map(|l| {
                if l.starts_with('/') {
                    format!("{}{l}", origin(&url))
                } else {
                    l.to_string()
                }
            });
            let redirect = (300..400).contains(&resp.status());
            if redirect && resp.header("X-Repo-Commit").is_none() {
                url = location.with_context(|| format!("{what}: redirect without Location"))?;
                continue;
            }
            let commit = resp
                .header("X-Repo-Commit")
                .with_context(|| {
                    format!("{what}: the answer has no X-Repo-Commit header (is {} a Hugging Face hub?)", self.endpoint)
                })?
                .trim()
                .to_string();
            let etag = resp
                .header("X-Linked-Etag")
                .or_else(|| resp.header("ETag"))
                .map(normalize_etag)
                .filter(|e| !e.is_empty() && !e.contains('/') && !e.contains(".."))
                .with_context(|| format!("{what}: the answer has no usable ETag"))?;
            let size = resp
                .header("X-Linked-Size")
                .or_else(|| resp.header("Content-Length"))
                .and_then(|s| s.trim().parse::<u64>().ok())
                .with_context(|| format!("{what}: the answer gives no file size"))?;
            let location = if redirect {
                location.with_context(|| format!("{what}: redirect without Location"))?
            } else {
                url
            };
            return Ok(FileMeta {
                commit,
                etag,
                size,
                location,
            });
        }
        bail!("{what}: too many redirects")
    }

    /// Makes `file` available in the cache at the commit `revision` resolves to and returns its
    /// snapshot path.
    pub(crate) fn fetch(
        &self,
        repo: &RepoCache,
        revision: &str,
        file: &str,
        progress: &mut Progress,
    ) -> Result<(PathBuf, String)> {
        if is_commit_hash(revision) {
            let p = repo.pointer(revision, file)?;
            if p.is_file() {
                return Ok((p, revision.to_string()));
            }
        }
        let meta = self.metadata(&repo.id, revision, file)?;
        let pointer = repo.pointer(&meta.commit, file)?;
        if pointer.is_file() {
            return Ok((pointer, meta.commit));
        }
        if !repo.blob(&meta.etag).is_file() {
            progress.ensure_total(meta.size);
            progress.file(file);
            self.download_blob(repo, file, &meta, progress)?;
        }
        let p = repo.link(&meta.commit, file, &meta.etag)?;
        Ok((p, meta.commit))
    }

    pub(super) fn download_blob(
        &self,
        repo: &RepoCache,
        file: &str,
        meta: &FileMeta,
        progress: &mut Progress,
    ) -> Result<()> {
        let blob = repo.blob(&meta.etag);
        let partial = repo.incomplete(&meta.etag);
        let lock_path = repo.lock_path(&meta.etag);
        for dir in [blob.parent(), lock_path.parent()].into_iter().flatten() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("creating the lock file {}", lock_path.display()))?;
        fs4::FileExt::lock(&lock).with_context(|| format!("locking {}", lock_path.display()))?;
        if blob.is_file() {
            return Ok(()); // another process finished it while we waited
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .with_context(|| format!("opening {}", partial.display()))?;
        let mut attempt = 0;
        loop {
            match self.continue_download(&mut out, &partial, file, meta, progress) {
                Ok(()) => break,
                Err(e) if attempt < self.retries && e.is::<Interrupted>() => {
                    attempt += 1;
                    tracing::warn!("{e:#}; resuming ({attempt}/{})", self.retries);
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                }
                Err(e) => return Err(e),
            }
        }
        drop(out);
        let len = std::fs::metadata(&partial)
            .with_context(|| format!("reading {}", partial.display()))?
            .len();
        if len != meta.size {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "downloading {file} of {}: got {len} bytes, the hub announced {}",
                repo.id,
                meta.size
            );
        }
        if is_sha256(&meta.etag) {
            let digest = sha256_file(&partial)?;
            if !digest.eq_ignore_ascii_case(&meta.etag) {
                let _ = std::fs::remove_file(&partial);
                bail!(
                    "downloading {file} of {}: the sha256 of the data ({digest}) is not the \
                     hub's ({}); the partial file was removed, run again",
                    repo.id,
                    meta.etag
                );
            }
        }
        std::fs::rename(&partial, &blob)
            .with_context(|| format!("moving {} to {}", partial.display(), blob.display()))?;
        drop(lock);
        Ok(())
    }

    /// One request for the bytes after what `out` holds.
    pub(super) fn continue_download(
        &self,
        out: &mut std::fs::File,
        partial: &Path,
        file: &str,
        meta: &FileMeta,
        progress: &mut Progress,
    ) -> Result<()> {
        let what = format!("downloading {file}");
        let mut start = out
            .metadata()
            .with_context(|| format!("reading {}", partial.display()))?
            .len();
        if start > meta.size {
            out.set_len(0)
                .with_context(|| format!("truncating {}", partial.display()))?;
            start = 0;
        }
        if start == meta.size {
            return Ok(());
        }
        if start > 0 {
            tracing::info!(
                "resuming {file} at {} of {}",
                DecimalBytes(start),
                DecimalBytes(meta.size)
            );
        }
        let mut req = self.request("GET", &meta.location);
        if start > 0 {
            req = req.set("Range", &format!("bytes={start}-"));
        }
        // The CDN may redirect again (absolute URLs, no token).
        let mut resp = self.call(req, &what)?;
        for _ in 0..5 {
            if !(300..400).contains(&resp.status()) {
                break;
            }
            let loc = resp
                .header("Location")
                .with_context(|| format!("{what}: redirect without Location"))?
                .to_string();
            let mut r = self.request("GET", &loc);
            if start > 0 {
                r = r.set("Range", &format!("bytes={start}-"));
            }
            resp = self.call(r, &what)?;
        }
        match resp.status() {
            206 => {
                let ok = resp
                    .header("Content-Range")
                    .is_some_and(|cr| cr.trim().starts_with(&format!("bytes {start}-")));
                if !ok {
                    bail!("{what}: the server answered a different range than bytes={start}-");
                }
            }
            200 if start > 0 => {
                // The server ignored the range: start over.
                out.set_len(0)
                    .with_context(|| format!("truncating {}", partial.display()))?;
            }
            200 => {}
            s => bail!("{what}: unexpected HTTP status {s}"),
        }
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let have = out.metadata().map(|m| m.len()).unwrap_or(0);
                    return Err(anyhow::Error::new(Interrupted).context(format!(
                        "{what}: connection lost after {} of {} ({e}); the partial file {} is \
                         kept and the next run resumes it",
                        DecimalBytes(have),
                        DecimalBytes(meta.size),
                        partial.display()
                    )));
                }
            };
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", partial.display()))?;
            progress.add(n as u64);
        }
        out.flush()
            .with_context(|| format!("writing {}", partial.display()))?;
        Ok(())
    }
}

/// A download that stopped midway (resumable).
#[derive(Debug)]
pub(super) struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("download interrupted")
    }
}

impl std::error::Error for Interrupted {}

pub(super) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
