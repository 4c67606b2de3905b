//! The `huggingface_hub` cache layout on disk: `blobs/`, `snapshots/`, `refs/`, the free space
//! check and what a repo's cache already holds.

use super::*;

/// One repo's folder in the hub cache (`models--owner--name`).
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    pub(crate) cache_dir: PathBuf,
    pub(crate) id: String,
}

impl RepoCache {
    pub(crate) fn new(cache_dir: &Path, id: &str) -> Self {
        Self {
            cache_dir: cache_dir.to_path_buf(),
            id: id.to_string(),
        }
    }
    pub(super) fn folder(&self) -> String {
        format!("models--{}", self.id.replace('/', "--"))
    }
    pub(crate) fn dir(&self) -> PathBuf {
        self.cache_dir.join(self.folder())
    }
    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.dir().join("blobs").join(etag)
    }
    pub(super) fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir().join("blobs").join(format!("{etag}.incomplete"))
    }
    pub(super) fn lock_path(&self, etag: &str) -> PathBuf {
        self.cache_dir
            .join(".locks")
            .join(self.folder())
            .join(format!("{etag}.lock"))
    }
    /// `snapshots/<commit>/<file>`. The commit and the file name come from the hub's answers
    /// and from index files, so both are checked (a 40-digit hex commit, a plain relative path)
    /// and the pointer always lies inside the repo's `snapshots/` (as `huggingface_hub`'s
    /// `_get_pointer_path` insists).
    pub(crate) fn pointer(&self, commit: &str, file: &str) -> Result<PathBuf> {
        if !is_commit_hash(commit) {
            bail!(
                "the hub answered with commit {:?} for {}, which is not a 40-digit commit hash",
                commit.chars().take(64).collect::<String>(),
                self.id
            );
        }
        check_repo_path(file)?;
        Ok(self.dir().join("snapshots").join(commit).join(file))
    }
    /// Writes `refs/<revision>` (nothing for a revision that is a commit hash).
    pub(crate) fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        check_repo_path(revision).context("the revision name")?;
        let path = self.dir().join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, commit).with_context(|| format!("writing {}", path.display()))
    }

    /// Links `snapshots/<commit>/<file>` to `blobs/<etag>` with a relative symlink (what
    /// `huggingface_hub` does; a copy where symlinks are not available).
    pub(super) fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.pointer(commit, file)?;
        let blob = self.blob(etag);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let parent = pointer
            .parent()
            .with_context(|| format!("bad repo path {file}"))?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        // A dangling link (its blob was deleted) is replaced.
        let _ = std::fs::remove_file(&pointer);
        let depth = file.split('/').count() + 1; // snapshots/<commit>/<dirs…>/<name>
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&target, &pointer);
        #[cfg(not(unix))]
        let linked: std::io::Result<()> = Err(std::io::ErrorKind::Unsupported.into());
        if linked.is_err() {
            std::fs::copy(&blob, &pointer)
                .with_context(|| format!("copying {} to {}", blob.display(), pointer.display()))?;
        }
        Ok(pointer)
    }
}

pub(super) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file path inside a repo (from a listing, an index file's `weight_map`, or a revision name):
/// only plain relative components: no `..`, `.`, empty part, absolute path or backslash, so that
/// nothing a hub or a model file says can reach outside the repo's folder.
pub(crate) fn check_repo_path(file: &str) -> Result<()> {
    let bad = file.is_empty()
        || file.starts_with('/')
        || file.contains('\\')
        || file.contains('\0')
        || file
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        bail!(
            "refusing the repo path {:?}: not a plain relative path",
            file.chars().take(200).collect::<String>()
        );
    }
    Ok(())
}

pub(super) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Repo paths of `listing` already in the cache: in the commit's snapshot, or as a blob with
/// the etag the listing gives (then only a link is missing).
pub(crate) fn cached_paths(repo: &RepoCache, listing: &Listing) -> HashSet<String> {
    listing
        .files
        .iter()
        .filter(|f| {
            repo.pointer(&listing.commit, &f.path)
                .is_ok_and(|p| p.is_file())
                || f.etag().is_some_and(|e| repo.blob(e).is_file())
        })
        .map(|f| f.path.clone())
        .collect()
}
