//! Tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Only what has been verified token-for-token against llama.cpp is supported (see
//! `shared/reference/candle-engine.md` and `tests/tokenizer.rs`): `tokenizer.ggml.model = gpt2`
//! with `tokenizer.ggml.pre = smollm` (SmolLM2), and SentencePiece `llama` without a space prefix
//! (Gemma 3). Anything else fails with [`EngineError::Load`] naming the value, because a
//! tokenizer that is silently wrong is worse than none; a `tokenizer.json` beside the GGUF is the
//! way to run such a model.
//!
//! Two copies of the same tokenizer are kept:
//! - `special` matches control tokens (GGUF token type 3) written as text, e.g. `<|im_start|>`;
//!   it is only ever used on text the engine itself produced (the chat template's own markers);
//! - `plain` never matches control tokens, so text typed by a user (`<|im_start|>` inside a
//!   message or a completion prompt) becomes ordinary text tokens and cannot inject structure.

use std::collections::HashSet;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::normalizers::replace::Replace;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::EngineError;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Texts of tokens that end a generation in some model family. llama.cpp treats a token with
/// one of these texts as a control token even where the GGUF says otherwise (Gemma 3's "</s>"
/// is user-defined there): typed in a message it stays text, generated it ends the sequence.
pub(crate) const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>",
];

/// The engine's tokenizer: vocabulary, special tokens and the two encoders described above.
pub(crate) struct GgufTokenizer {
    special: Tokenizer,
    plain: Tokenizer,
    /// Control tokens as (text, id), longest text first (for leftmost-longest matching).
    control_tokens: Vec<(String, u32)>,
    /// Token strings by id (as stored in the GGUF, i.e. byte-level encoded for gpt2 models).
    tokens: Vec<String>,
    /// How token strings spell bytes.
    spelling: Spelling,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_id: Option<u32>,
    pub(crate) add_bos: bool,
}

/// How a vocabulary's token strings spell the bytes of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spelling {
    /// GPT-2 byte-level: each byte is one printable character.
    ByteLevel,
    /// SentencePiece: "▁" for a space, `<0xAB>` for a byte outside the vocabulary.
    SentencePiece,
    /// Unknown (a `tokenizer.json`): a token's bytes are its decoded text.
    Decoded,
}

/// GPT-2's byte-to-character table, inverted: printable bytes stand for themselves, the others
/// are the characters from U+0100 on, in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if printable(c) {
        return u8::try_from(c).ok();
    }
    let n = c.checked_sub(256)?;
    (0u32..=255).filter(|&b| !printable(b)).nth(n as usize).and_then(|b| u8::try_from(b).ok())
}

fn md<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

fn md_string(ct: &Content, key: &str) -> Result<Option<String>, EngineError> {
    match md(ct, key) {
        None => Ok(None),
        Some(v) => v
            .to_string()
            .map(|s| Some(s.clone()))
            .map_err(|e| EngineError::Load(format!("metadata {key}: {e}"))),
    }
}

fn md_u32(ct: &Content, key: &str) -> Option<u32> {
    let v = md(ct, key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_i32().ok().and_then(|x| u32::try_from(x).ok()))
        .or_else(|| v.to_u64().ok().and_then(|x| u32::try_from(x).ok()))
}

fn md_string_array(ct: &Content, key: &str) -> Result<Vec<String>, EngineError> {
    let v = md(ct, key).ok_or_else(|| EngineError::Load(format!("GGUF has no {key}")))?;
    let arr = v
        .to_vec()
        .map_err(|e| EngineError::Load(format!("metadata {key}: {e}")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|e| EngineError::Load(format!("metadata {key}: {e}")))
        })
        .collect()
}

fn md_i32_array(ct: &Content, key: &str) -> Result<Option<Vec<i32>>, EngineError> {
    let Some(v) = md(ct, key) else {
        return Ok(None);
    };
    let arr = v
        .to_vec()
        .map_err(|e| EngineError::Load(format!("metadata {key}: {e}")))?;
    arr.iter()
        .map(|x| {
            x.to_i32()
                .or_else(|_| x.to_u32().map(|u| u as i32))
                .map_err(|e| EngineError::Load(format!("metadata {key}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Vocabulary map, the first id winning should a GGUF repeat a token string.
fn vocab_of(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(id as u32);
    }
    vocab
}

/// `tokenizer.ggml.model = gpt2`: byte-level BPE from the GGUF's merges, with the
/// pre-tokenizer `tokenizer.ggml.pre` names (only mappings verified against llama.cpp).
fn byte_level_bpe(ct: &Content, tokens: &[String]) -> Result<Tokenizer, EngineError> {
    let pre = md_string(ct, "tokenizer.ggml.pre")?.ok_or_else(|| {
        EngineError::Load("GGUF has no tokenizer.ggml.pre (pre-tokenizer unknown)".into())
    })?;
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        other => return Err(EngineError::Load(format!(
            "unsupported pre-tokenizer tokenizer.ggml.pre = {other:?} for tokenizer model \"gpt2\" \
             (supported: \"smollm\"); put the model's tokenizer.json beside the GGUF to use it"
        ))),
    };
    let merges = md_string_array(ct, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| EngineError::Load(format!("malformed merge {m:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .build()
        .map_err(|e| tok_err("building BPE", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    Ok(tokenizer)
}

/// `tokenizer.ggml.model = llama`: SentencePiece (Gemma 3). llama.cpp merges the adjacent pair
/// whose joined piece has the highest score, leftmost first; the same result comes from BPE
/// with one merge per way of splitting a normal piece into two vocabulary pieces, ranked by the
/// piece's score, plus byte fallback for characters outside the vocabulary. Spaces become "▁".
fn sentencepiece(ct: &Content, tokens: &[String], types: Option<&[i32]>) -> Result<Tokenizer, EngineError> {
    if let Some(pre) = md_string(ct, "tokenizer.ggml.pre")?.filter(|p| p != "default") {
        return Err(EngineError::Load(format!(
            "unsupported pre-tokenizer tokenizer.ggml.pre = {pre:?} for tokenizer model \"llama\" \
             (supported: \"default\"); put the model's tokenizer.json beside the GGUF to use it"
        )));
    }
    // llama.cpp prepends a space to the first piece of text only, which a normalizer (applied
    // to every piece between special tokens) cannot reproduce; refuse rather than differ.
    let add_space_prefix = md(ct, "tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
    if add_space_prefix {
        return Err(EngineError::Load(
            "SentencePiece tokenizers with tokenizer.ggml.add_space_prefix = true (Llama 2 style) are not \
             supported; put the model's tokenizer.json beside the GGUF to use it"
                .into(),
        ));
    }
    let scores = md_f32_array(ct, "tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        return Err(EngineError::Load(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let vocab = vocab_of(tokens);
    let mut ranked: Vec<(f32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.is_some_and(|t| t[id] != TOKEN_TYPE_NORMAL) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&piece[..at]), vocab.get(&piece[at..])) {
                ranked.push((scores[id], l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = ranked
        .into_iter()
        .map(|(_, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = md_u32(ct, "tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(|e| tok_err("building the SentencePiece model", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(Replace::new(" ", "\u{2581}").map_err(|e| tok_err("normalizer", e))?))
        .map_err(|e| tok_err("normalizer", e))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("\u{2581}", " ").map_err(|e| tok_err("decoder", e))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    Ok(tokenizer)
}

fn md_f32_array(ct: &Content, key: &str) -> Result<Vec<f32>, EngineError> {
    let v = md(ct, key).ok_or_else(|| EngineError::Load(format!("GGUF has no {key}")))?;
    let arr = v.to_vec().map_err(|e| EngineError::Load(format!("metadata {key}: {e}")))?;
    arr.iter()
        .map(|x| x.to_f32().map_err(|e| EngineError::Load(format!("metadata {key}: {e}"))))
        .collect()
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("{context}: {e}"))
}

impl GgufTokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub(crate) fn from_gguf(ct: &Content) -> Result<Self, EngineError> {
        let model = md_string(ct, "tokenizer.ggml.model")?
            .ok_or_else(|| EngineError::Load("GGUF has no tokenizer.ggml.model".into()))?;
        let tokens = md_string_array(ct, "tokenizer.ggml.tokens")?;
        let types = md_i32_array(ct, "tokenizer.ggml.token_type")?;
        if let Some(t) = &types {
            if t.len() != tokens.len() {
                return Err(EngineError::Load(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
        }
        let (mut tokenizer, spelling) = match model.as_str() {
            "gpt2" => (byte_level_bpe(ct, &tokens)?, Spelling::ByteLevel),
            "llama" => (sentencepiece(ct, &tokens, types.as_deref())?, Spelling::SentencePiece),
            other => {
                return Err(EngineError::Load(format!(
                    "unsupported tokenizer model tokenizer.ggml.model = {other:?} (supported: \"gpt2\", \"llama\")"
                )))
            }
        };

        let mut control_tokens = Vec::new();
        if let Some(types) = &types {
            let mut specials = Vec::new();
            let mut user_defined = Vec::new();
            for (id, (t, ty)) in tokens.iter().zip(types).enumerate() {
                let ty = if END_OF_GENERATION.contains(&t.as_str()) { TOKEN_TYPE_CONTROL } else { *ty };
                match ty {
                    TOKEN_TYPE_CONTROL => {
                        specials.push(AddedToken::from(t.clone(), true));
                        control_tokens.push((t.clone(), id as u32));
                    }
                    TOKEN_TYPE_USER_DEFINED => {
                        // Matched in the raw text, as llama.cpp does (Gemma's "  " and "\n\n"
                        // would never match after spaces became "▁").
                        user_defined.push(AddedToken::from(t.clone(), false).normalized(false));
                    }
                    _ => {}
                }
            }
            tokenizer
                .add_special_tokens(specials)
                .map_err(|e| tok_err("adding control tokens", e))?;
            tokenizer
                .add_tokens(user_defined)
                .map_err(|e| tok_err("adding user-defined tokens", e))?;
        }
        control_tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let special = tokenizer.clone();
        let mut plain = tokenizer;
        plain.set_encode_special_tokens(true);

        let n = tokens.len() as u32;
        let bos_id = md_u32(ct, "tokenizer.ggml.bos_token_id").filter(|&i| i < n);
        let eos_id = md_u32(ct, "tokenizer.ggml.eos_token_id").filter(|&i| i < n);
        let add_bos = md(ct, "tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);

        Ok(Self {
            special,
            plain,
            control_tokens,
            tokens,
            spelling,
            bos_id,
            eos_id,
            add_bos,
        })
    }

    /// The tokenizer of a `tokenizer.json` file (Hugging Face format) instead of the GGUF's
    /// metadata; BOS/EOS ids and `add_bos_token` still come from the GGUF. Its vocabulary must
    /// not be larger than the model's (`vocab_size`).
    pub(crate) fn from_tokenizer_json(path: &std::path::Path, ct: &Content, vocab_size: usize) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| tok_err(&format!("cannot read {}", path.display()), e))?;
        let n = tokenizer.get_vocab_size(true);
        if n == 0 || n > vocab_size {
            return Err(EngineError::Load(format!(
                "{} has {n} tokens but the model's vocabulary has {vocab_size}",
                path.display()
            )));
        }
        let mut tokens = vec![String::new(); n];
        for (text, id) in tokenizer.get_vocab(true) {
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = text;
            }
        }
        let mut control_tokens: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        control_tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let special = tokenizer.clone();
        let mut plain = tokenizer;
        plain.set_encode_special_tokens(true);
        let n = n as u32;
        Ok(Self {
            special,
            plain,
            control_tokens,
            tokens,
            spelling: Spelling::Decoded,
            bos_id: md_u32(ct, "tokenizer.ggml.bos_token_id").filter(|&i| i < n),
            eos_id: md_u32(ct, "tokenizer.ggml.eos_token_id").filter(|&i| i < n),
            add_bos: md(ct, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        })
    }

    /// Writes the tokenizer in Hugging Face's `tokenizer.json` format (tests and tools).
    #[cfg(test)]
    pub(crate) fn save_json(&self, path: &std::path::Path) -> Result<(), EngineError> {
        self.special.save(path, false).map_err(|e| tok_err("saving tokenizer.json", e))
    }

    /// Number of tokens in the vocabulary.
    pub(crate) fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The GGUF's string for a token id.
    pub(crate) fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The bytes of text a token stands for (a byte-level or byte-fallback token may hold part
    /// of a UTF-8 character); a control token's bytes are its text.
    pub(crate) fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.tokens.get(id as usize) else { return Vec::new() };
        if self.control_tokens.iter().any(|(_, c)| *c == id) {
            return piece.as_bytes().to_vec();
        }
        self.text_bytes(id, piece)
    }

    /// Every token's bytes by id, as [`Self::token_bytes`] but with `marker` before each
    /// control token's text, which no text can spell (llguidance's token trie wants this).
    pub(crate) fn vocabulary_bytes(&self, marker: u8) -> Vec<Vec<u8>> {
        let control: HashSet<u32> = self.control_tokens.iter().map(|(_, id)| *id).collect();
        (0u32..)
            .zip(&self.tokens)
            .map(|(id, piece)| {
                if control.contains(&id) {
                    [&[marker], piece.as_bytes()].concat()
                } else {
                    self.text_bytes(id, piece)
                }
            })
            .collect()
    }

    /// The bytes of text an ordinary (not control) token stands for.
    fn text_bytes(&self, id: u32, piece: &str) -> Vec<u8> {
        match self.spelling {
            Spelling::ByteLevel => match piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>() {
                Some(bytes) => bytes,
                None => piece.as_bytes().to_vec(), // an added token spelled as plain text
            },
            Spelling::SentencePiece => {
                let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                match hex.filter(|h| h.len() == 2).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => vec![b],
                    None => piece.replace('\u{2581}', " ").into_bytes(),
                }
            }
            Spelling::Decoded => self.decode(&[id], false).unwrap_or_default().into_bytes(),
        }
    }

    /// Id of a control token given its text, if the vocabulary has it as a control token.
    pub(crate) fn control_id(&self, text: &str) -> Option<u32> {
        self.control_tokens
            .iter()
            .find(|(t, _)| t == text)
            .map(|(_, id)| *id)
    }

    /// Control token strings and ids.
    pub(crate) fn control_tokens(&self) -> &[(String, u32)] {
        &self.control_tokens
    }

    /// Encodes untrusted text: control-token strings in it become ordinary text tokens.
    pub(crate) fn encode_plain(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        encode_with(&self.plain, text)
    }

    /// Encodes trusted text (produced by the engine): control-token strings become control tokens.
    pub(crate) fn encode_trusted(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        encode_with(&self.special, text)
    }

    /// Decodes ids to text; control tokens are left out when `skip_special` is set.
    pub(crate) fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        self.special
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Inference(format!("detokenization failed: {e}")))
    }

    /// Finds the leftmost (then longest) control-token string in `text` at or after `from`.
    pub(crate) fn find_control(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (t, id) in &self.control_tokens {
            if t.is_empty() {
                continue;
            }
            if let Some(pos) = text[from..].find(t.as_str()) {
                let start = from + pos;
                let better = match best {
                    None => true,
                    Some((s, len, _)) => start < s || (start == s && t.len() > len),
                };
                if better {
                    best = Some((start, t.len(), *id));
                }
            }
        }
        best
    }

    /// Whether `text` contains any control-token string.
    pub(crate) fn contains_control(&self, text: &str) -> bool {
        self.find_control(text, 0).is_some()
    }
}

/// Incremental detokenizer: turns generated ids into text without ever emitting a partial
/// UTF-8 sequence (byte-level BPE tokens can end in the middle of a character).
///
/// It keeps a small window of ids: `prefix` is the already-emitted text of
/// `ids[prefix_offset..read_offset]`; new text is what decoding `ids[prefix_offset..]` adds to
/// it, held back while it ends in U+FFFD (an incomplete character).
#[derive(Debug, Default)]
pub(crate) struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds a token; returns the newly completed text (possibly empty).
    pub(crate) fn push(&mut self, tok: &GgufTokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new_text = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Keep the window small: drop ids before the new prefix.
            if self.prefix_offset > 0 {
                self.ids.drain(..self.prefix_offset);
                self.read_offset -= self.prefix_offset;
                self.prefix_offset = 0;
            }
            Ok(new_text)
        } else {
            Ok(String::new())
        }
    }
}

fn encode_with(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, EngineError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    tokenizer
        .encode_fast(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| EngineError::InvalidRequest(format!("tokenization failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Option<GgufTokenizer> {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("SKIP: model file {} is missing", path.display());
            return None;
        }
        let mut f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let ct = Content::read(&mut f).unwrap();
        Some(GgufTokenizer::from_gguf(&ct).unwrap())
    }

    #[test]
    fn incremental_decoding_never_splits_characters() {
        let Some(tok) = tokenizer() else { return };
        let text = "Ünïcödé 日本語 🎉🚀 👨‍👩‍👧 ok";
        let ids = tok.encode_plain(text).unwrap();
        let mut dec = IncrementalDecoder::default();
        let mut out = String::new();
        for id in ids {
            let piece = dec.push(&tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, text);
    }

    #[test]
    fn control_tokens_and_ids() {
        let Some(tok) = tokenizer() else { return };
        assert_eq!(tok.bos_id, Some(1));
        assert_eq!(tok.eos_id, Some(2));
        assert!(!tok.add_bos);
        assert_eq!(tok.control_id("<|im_start|>"), Some(1));
        assert_eq!(tok.control_id("<|im_end|>"), Some(2));
        assert_eq!(tok.encode_trusted("<|im_start|>user").unwrap()[0], 1);
        assert!(!tok.encode_plain("<|im_start|>user").unwrap().contains(&1));
    }
}
