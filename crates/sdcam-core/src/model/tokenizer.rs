//! CLIP tokenizer matching the SLOW `transformers.CLIPTokenizer` (4.35) that diffusers'
//! `StableDiffusionPipeline` loads, in the configuration without `ftfy`.
//!
//! Pipeline, mirroring the Python code path step by step:
//! 1. added/special tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token, …) are split out
//!    of the raw text first (`PreTrainedTokenizer.tokenize` + its trie) — so SD 2.x's pad token
//!    `!` becomes its own token (id 0) wherever it appears;
//! 2. every other piece goes through `BasicTokenizer(do_lower_case=True, strip_accents=False,
//!    do_split_on_punc=False)`: control/format characters dropped, Unicode spaces → ' ', spaces
//!    around CJK ideographs, NFC, split on whitespace, lower-case;
//! 3. the CLIP regex splits words, each word is mapped through CLIP's byte→unicode table and
//!    BPE-merged (with the `tokenizers` crate's BPE model, `</w>` end-of-word suffix);
//! 4. `bos + ids[..max_len-2] + eos`, padded with the pad token to `model_max_length` (77).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use regex::Regex;
use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{Model, NormalizedString};

/// `merges.txt` lines the slow CLIP tokenizer reads: `[1 : 49152 - 256 - 2 + 1]`.
const MAX_MERGES: usize = 49152 - 256 - 2;

/// The CLIP pre-tokenization regex (case-insensitive, as in `tokenization_clip.py`).
const CLIP_PATTERN: &str = r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A token that is split out of the text before BPE (`AddedToken`).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

/// The CLIP tokenizer of a Stable Diffusion pipeline.
pub struct ClipTokenizer {
    bpe: BPE,
    vocab: HashMap<String, u32>,
    byte_encoder: [char; 256],
    pattern: Regex,
    control: Regex,
    space_sep: Regex,
    added: Vec<AddedToken>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// CLIP's `bytes_to_unicode()`: printable bytes map to themselves, the rest to U+0100….
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0u32;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(256 + n - 1).unwrap_or('\0')
        };
    }
    table
}

/// BERT's `_is_chinese_char` ranges (CJK ideographs only, not kana/hangul).
fn is_cjk_ideograph(c: char) -> bool {
    let cp = c as u32;
    (0x4E00..=0x9FFF).contains(&cp)
        || (0x3400..=0x4DBF).contains(&cp)
        || (0x20000..=0x2A6DF).contains(&cp)
        || (0x2A700..=0x2B73F).contains(&cp)
        || (0x2B740..=0x2B81F).contains(&cp)
        || (0x2B820..=0x2CEAF).contains(&cp)
        || (0xF900..=0xFAFF).contains(&cp)
        || (0x2F800..=0x2FA1F).contains(&cp)
}

/// Token content of a special-token entry: a plain string or `{"content": …}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn token_flags(v: &Value) -> (bool, bool) {
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    (flag("lstrip"), flag("rstrip"))
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Special-token settings gathered from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: (String, bool, bool),
    eos: (String, bool, bool),
    unk: (String, bool, bool),
    pad: (String, bool, bool),
    max_len: usize,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        let t = |s: &str| (s.to_string(), false, false);
        Self {
            bos: t("<|startoftext|>"),
            eos: t("<|endoftext|>"),
            unk: t("<|endoftext|>"),
            // CLIPTokenizer's default: "<|endoftext|>" ("hack to enable padding").
            pad: t("<|endoftext|>"),
            max_len: 77,
        }
    }
}

impl SpecialTokens {
    /// Applies the keys of one json file (later files override earlier ones, as transformers does
    /// with `special_tokens_map.json` over `tokenizer_config.json`).
    fn apply(&mut self, v: &Value) {
        for (key, slot) in [
            ("bos_token", &mut self.bos),
            ("eos_token", &mut self.eos),
            ("unk_token", &mut self.unk),
            ("pad_token", &mut self.pad),
        ] {
            if let Some(entry) = v.get(key) {
                if let Some(c) = token_content(entry) {
                    let (l, r) = token_flags(entry);
                    *slot = (c, l, r);
                }
            }
        }
        if let Some(m) = v.get("model_max_length").and_then(Value::as_u64) {
            // transformers stores a huge sentinel when unset; CLIP's text encoder takes 77.
            if m <= 4096 {
                self.max_len = m as usize;
            }
        }
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer from a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`
    /// (+ `tokenizer_config.json`, `special_tokens_map.json`), or `tokenizer.json` when that is
    /// all there is.
    pub(crate) fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        if vocab_path.is_file() && merges_path.is_file() {
            return Self::from_files(
                &vocab_path,
                &merges_path,
                &[
                    dir.join("tokenizer_config.json"),
                    dir.join("special_tokens_map.json"),
                ],
            );
        }
        let tj = dir.join("tokenizer.json");
        if tj.is_file() {
            return Self::from_tokenizer_json(
                &tj,
                &[
                    dir.join("tokenizer_config.json"),
                    dir.join("special_tokens_map.json"),
                ],
            );
        }
        bail!(
            "tokenizer folder {} has neither vocab.json + merges.txt nor tokenizer.json; \
             is this the `tokenizer/` folder of a diffusers-layout model?",
            dir.display()
        )
    }

    /// Loads from explicit `vocab.json` and `merges.txt` plus config json files (applied in
    /// order; missing ones are skipped).
    ///
    /// # Errors
    /// A file cannot be read, or the vocabulary, merges or a config json is malformed.
    pub fn from_files(vocab: &Path, merges: &Path, configs: &[std::path::PathBuf]) -> Result<Self> {
        let vocab_text = std::fs::read_to_string(vocab)
            .with_context(|| format!("reading {}", vocab.display()))?;
        let merges_text = std::fs::read_to_string(merges)
            .with_context(|| format!("reading {}", merges.display()))?;
        let mut config_texts = Vec::new();
        for cfg in configs.iter().filter(|c| c.is_file()) {
            config_texts.push(
                std::fs::read_to_string(cfg)
                    .with_context(|| format!("reading {}", cfg.display()))?,
            );
        }
        let configs: Vec<&str> = config_texts.iter().map(String::as_str).collect();
        Self::from_strs(&vocab_text, &merges_text, &configs)
            .with_context(|| format!("CLIP tokenizer from {}", vocab.display()))
    }

    /// Like [`Self::from_files`], from the texts of `vocab.json`, `merges.txt` and the config
    /// jsons (e.g. `{"pad_token": "!"}`), applied in order.
    pub(crate) fn from_strs(vocab_json: &str, merges_txt: &str, configs: &[&str]) -> Result<Self> {
        let vocab_map: HashMap<String, u32> = serde_json::from_str(vocab_json)
            .context("vocab.json: expected a {token: id} object")?;
        // Python: read().strip().split("\n")[1 : 49152 - 256 - 2 + 1]
        let merges_list: Vec<(String, String)> = merges_txt
            .trim()
            .split('\n')
            .skip(1)
            .take(MAX_MERGES)
            .enumerate()
            .map(|(i, line)| {
                let mut it = line.split_whitespace();
                match (it.next(), it.next(), it.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                    _ => bail!(
                        "merges.txt line {}: expected two space-separated symbols, got {line:?}",
                        i + 2
                    ),
                }
            })
            .collect::<Result<_>>()?;
        let mut special = SpecialTokens::default();
        for cfg in configs {
            let v: Value = serde_json::from_str(cfg).context("parsing a tokenizer config json")?;
            special.apply(&v);
        }
        Self::build(vocab_map, merges_list, special, Vec::new())
            .context("building the CLIP tokenizer")
    }

    /// Loads from a `tokenizers` `tokenizer.json` (BPE model + added tokens), then applies the
    /// config jsons that exist among `configs` (`tokenizer_config.json`,
    /// `special_tokens_map.json`), which set the pad token and length as they do for
    /// transformers' `CLIPTokenizerFast` (sd-turbo pads with `!`, which `tokenizer.json` does not
    /// say).
    pub(crate) fn from_tokenizer_json(path: &Path, configs: &[std::path::PathBuf]) -> Result<Self> {
        let v = read_json(path)?;
        let model = v
            .get("model")
            .with_context(|| format!("{}: no \"model\" entry", path.display()))?;
        if let Some(t) = model.get("type").and_then(Value::as_str) {
            if t != "BPE" {
                bail!(
                    "{}: model type {t:?} is not a CLIP BPE tokenizer",
                    path.display()
                );
            }
        }
        let vocab_map: HashMap<String, u32> =
            serde_json::from_value(model.get("vocab").cloned().unwrap_or(Value::Null))
                .with_context(|| {
                    format!("{}: model.vocab is not a {{token: id}} map", path.display())
                })?;
        let mut merges_list = Vec::new();
        for m in model
            .get("merges")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let pair = match m {
                Value::String(s) => {
                    let mut it = s.split(' ');
                    it.next()
                        .zip(it.next())
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                }
                Value::Array(a) if a.len() == 2 => a[0]
                    .as_str()
                    .zip(a[1].as_str())
                    .map(|(x, y)| (x.to_string(), y.to_string())),
                _ => None,
            };
            merges_list
                .push(pair.with_context(|| format!("{}: malformed merge {m}", path.display()))?);
        }
        merges_list.truncate(MAX_MERGES);
        let mut special = SpecialTokens::default();
        if let Some(p) = v.pointer("/padding/pad_token").and_then(Value::as_str) {
            special.pad = (p.to_string(), false, false);
        }
        if let Some(m) = v.pointer("/truncation/max_length").and_then(Value::as_u64) {
            special.max_len = m as usize;
        }
        for cfg in configs.iter().filter(|c| c.is_file()) {
            special.apply(&read_json(cfg)?);
        }
        let mut extra = Vec::new();
        for t in v
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(c), Some(id)) = (
                t.get("content").and_then(Value::as_str),
                t.get("id").and_then(Value::as_u64),
            ) {
                let (l, r) = token_flags(t);
                extra.push(AddedToken {
                    content: c.to_string(),
                    id: id as u32,
                    lstrip: l,
                    rstrip: r,
                });
            }
        }
        Self::build(vocab_map, merges_list, special, extra)
            .with_context(|| format!("building the CLIP tokenizer from {}", path.display()))
    }

    fn build(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        special: SpecialTokens,
        mut added: Vec<AddedToken>,
    ) -> Result<Self> {
        let id_of = |tok: &(String, bool, bool), what: &str| -> Result<AddedToken> {
            let id = vocab
                .get(&tok.0)
                .copied()
                .or_else(|| added.iter().find(|a| a.content == tok.0).map(|a| a.id))
                .with_context(|| format!("{what} {:?} is not in the vocabulary", tok.0))?;
            Ok(AddedToken {
                content: tok.0.clone(),
                id,
                lstrip: tok.1,
                rstrip: tok.2,
            })
        };
        let bos = id_of(&special.bos, "bos_token")?;
        let eos = id_of(&special.eos, "eos_token")?;
        let unk = id_of(&special.unk, "unk_token")?;
        let pad = id_of(&special.pad, "pad_token")?;
        // transformers adds every special token to the added-token table (order: bos, eos, unk,
        // pad), even when it is already in the vocabulary.
        for t in [bos.clone(), eos.clone(), unk.clone(), pad.clone()] {
            if !added.iter().any(|a| a.content == t.content) {
                added.push(t);
            }
        }
        if special.max_len < 2 {
            bail!("model_max_length {} is too small", special.max_len);
        }
        let bpe_vocab: Vocab = vocab.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .end_of_word_suffix("</w>".to_string())
            .unk_token(special.unk.0.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("invalid BPE vocabulary/merges: {e}"))?;
        Ok(Self {
            bpe,
            vocab,
            byte_encoder: bytes_to_unicode(),
            pattern: Regex::new(CLIP_PATTERN).context("CLIP regex")?,
            control: Regex::new(r"^\p{C}$").context("control regex")?,
            space_sep: Regex::new(r"^\p{Zs}$").context("space regex")?,
            added,
            bos_id: bos.id,
            eos_id: eos.id,
            pad_id: pad.id,
            unk_id: unk.id,
            max_len: special.max_len,
        })
    }

    /// Sequence length of [`encode`](Self::encode) (`model_max_length`, 77 for CLIP).
    #[cfg(test)]
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    /// `<|startoftext|>` id.
    #[cfg(test)]
    pub(crate) fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// `<|endoftext|>` id.
    #[cfg(test)]
    pub(crate) fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Padding id (49407 for SD 1.5, 0 = `!` for SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids`:
    /// always 77 ids, `bos … eos pad…`.
    ///
    /// # Errors
    /// Only when the underlying BPE model fails on the text (not expected for any UTF-8 input).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenize_ids(prompt)?;
        ids.truncate(self.max_len - 2);
        let mut out = Vec::with_capacity(self.max_len);
        out.push(self.bos_id);
        out.extend(ids);
        out.push(self.eos_id);
        out.resize(self.max_len, self.pad_id);
        Ok(out)
    }

    /// The part of `prompt` that [`Self::encode`] cuts off (the text encoder reads
    /// `model_max_length − 2` = 75 tokens), as text, or `None` when it all fits. diffusers logs
    /// the same warning ("The following part of your input was truncated …").
    pub(crate) fn truncated_part(&self, prompt: &str) -> Result<Option<String>> {
        let ids = self.tokenize_ids(prompt)?;
        let keep = self.max_len - 2;
        Ok((ids.len() > keep).then(|| self.decode(&ids[keep..])))
    }

    /// Text of token ids (CLIP's `decode`: byte-level symbols back to UTF-8, `</w>` = a space).
    pub(crate) fn decode(&self, ids: &[u32]) -> String {
        let mut by_id: HashMap<u32, &str> = HashMap::with_capacity(ids.len());
        for (tok, id) in &self.vocab {
            if ids.contains(id) {
                by_id.insert(*id, tok);
            }
        }
        let mut byte_of: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, c) in self.byte_encoder.iter().enumerate() {
            byte_of.insert(*c, b as u8);
        }
        let mut bytes = Vec::new();
        for id in ids {
            let tok = by_id.get(id).copied().unwrap_or("");
            let (body, space) = match tok.strip_suffix("</w>") {
                Some(b) => (b, true),
                None => (tok, false),
            };
            bytes.extend(body.chars().filter_map(|c| byte_of.get(&c)));
            if space {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Ids of the prompt without bos/eos, untruncated.
    pub(crate) fn tokenize_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in self.split_added(prompt) {
            match piece {
                Piece::Added(id) => ids.push(id),
                Piece::Text(t) => self.tokenize_text(&t, &mut ids)?,
            }
        }
        Ok(ids)
    }

    /// `PreTrainedTokenizer.tokenize`'s added-token split (longest match, leftmost first) with
    /// the tokens' lstrip/rstrip.
    fn split_added(&self, text: &str) -> Vec<Piece> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut rest_start = 0;
        let mut i = 0;
        let mut strip_next = false;
        while i < text.len() {
            let best = self
                .added
                .iter()
                .filter(|a| !a.content.is_empty() && text[i..].starts_with(&a.content))
                .max_by_key(|a| a.content.len());
            if let Some(a) = best {
                let mut before = &text[rest_start..i];
                if strip_next {
                    before = before.trim_start();
                }
                if a.lstrip {
                    before = before.trim_end();
                }
                if !before.is_empty() {
                    pieces.push(Piece::Text(before.to_string()));
                }
                pieces.push(Piece::Added(a.id));
                strip_next = a.rstrip;
                i += a.content.len();
                rest_start = i;
            } else {
                i += text[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
        let mut tail = &text[rest_start..];
        if strip_next {
            tail = tail.trim_start();
        }
        if !tail.is_empty() {
            pieces.push(Piece::Text(tail.to_string()));
        }
        pieces
    }

    /// BERT `BasicTokenizer(do_lower_case=True, strip_accents=False, do_split_on_punc=False)`
    /// followed by `" ".join(...)`.
    fn basic_clean(&self, text: &str) -> String {
        let mut buf = [0u8; 4];
        let mut cleaned = String::with_capacity(text.len());
        for c in text.chars() {
            let s: &str = c.encode_utf8(&mut buf);
            if c == '\0' || c == '\u{FFFD}' {
                continue;
            }
            if c == ' ' || c == '\t' || c == '\n' || c == '\r' || self.space_sep.is_match(s) {
                cleaned.push(' ');
            } else if self.control.is_match(s) {
                continue;
            } else if is_cjk_ideograph(c) {
                cleaned.push(' ');
                cleaned.push(c);
                cleaned.push(' ');
            } else {
                cleaned.push(c);
            }
        }
        let mut normalized = NormalizedString::from(cleaned.as_str());
        normalized.nfc();
        normalized
            .get()
            .split_whitespace()
            .map(str::to_lowercase)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `CLIPTokenizer._tokenize` + id conversion for a piece without added tokens.
    fn tokenize_text(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        let cleaned = self.basic_clean(text);
        for m in self.pattern.find_iter(&cleaned) {
            let word = m.as_str();
            // The Python BPE cache maps the two literal specials to themselves (no `</w>`).
            if word == "<|startoftext|>" || word == "<|endoftext|>" {
                ids.push(self.vocab.get(word).copied().unwrap_or(self.unk_id));
                continue;
            }
            let encoded: String = word
                .bytes()
                .map(|b| self.byte_encoder[b as usize])
                .collect();
            let tokens = self
                .bpe
                .tokenize(&encoded)
                .map_err(|e| anyhow::anyhow!("BPE failed on {word:?}: {e}"))?;
            ids.extend(tokens.into_iter().map(|t| t.id));
        }
        Ok(())
    }
}

enum Piece {
    Added(u32),
    Text(String),
}

#[cfg(test)]
mod tests;
