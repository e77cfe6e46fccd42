//! Tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Only what has been verified token-for-token against llama.cpp is supported (see
//! `shared/reference/candle-engine.md` and the golden tests in `golden.rs`):
//! `tokenizer.ggml.model = gpt2` with `tokenizer.ggml.pre` = `smollm` (SmolLM2), `qwen2` (Qwen2,
//! Qwen2.5, Qwen3) or `llama-bpe` (Llama 3.x), and SentencePiece `llama` with a space prefix
//! (Llama 2, Phi-3) or without (Gemma 3). Anything else fails with [`EngineError::Load`] naming
//! the value, because a tokenizer that is silently wrong is worse than none; a `tokenizer.json`
//! beside the GGUF is the way to run such a model.
//!
//! Two copies of the same tokenizer are kept:
//! - `special` matches control tokens (GGUF token type 3) written as text, e.g. `<|im_start|>`;
//!   it is only ever used on text the engine itself produced (the chat template's own markers);
//! - `plain` never matches control tokens, so text typed by a user (`<|im_start|>` inside a
//!   message or a completion prompt) becomes ordinary text tokens and cannot inject structure.

use std::collections::HashSet;

use aho_corasick::{AhoCorasick, MatchKind};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

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
    /// `plain` without SentencePiece's space prefix, for text that continues other text
    /// ([`Self::encode_fragment`]); `None` where `plain` adds no prefix.
    fragment: Option<Tokenizer>,
    /// Control tokens as (text, id), longest text first, then by id.
    control_tokens: Vec<(String, u32)>,
    /// Every control-token text at once, leftmost-longest, built once at load: finding all
    /// markers in a text is one pass over it, however many control tokens the model has.
    control_matcher: ControlMatcher,
    /// Token strings by id (as stored in the GGUF, i.e. byte-level encoded for gpt2 models).
    tokens: Vec<String>,
    /// How token strings spell bytes.
    spelling: Spelling,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_id: Option<u32>,
    pub(crate) add_bos: bool,
    /// Control tokens that swallow the whitespace after them (llama.cpp's `RSTRIP`: Phi-3's).
    rstrip: HashSet<u32>,
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
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if printable(c) {
        return u8::try_from(c).ok();
    }
    let n = c.checked_sub(256)?;
    (0u32..=255)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .and_then(|b| u8::try_from(b).ok())
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

/// Qwen2's pre-tokenizer split (llama.cpp's form of the `tokenizer.json` regex, with the
/// case-insensitive contractions spelled out): single digits.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's: as Qwen2's, but digits in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The byte-level pre-tokenizer after a split by `regex` (each match a piece).
fn regex_then_bytes(regex: &str) -> Result<PreTokenizerWrapper, EngineError> {
    let split = Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err("pre-tokenizer", e))?;
    Ok(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])
    .into())
}

/// `tokenizer.ggml.model = gpt2`: byte-level BPE from the GGUF's merges, with the
/// pre-tokenizer `tokenizer.ggml.pre` names (only mappings verified against llama.cpp).
/// Returns the tokenizer and whether llama.cpp adds BOS for this family when the GGUF does not
/// say (`tokenizer.ggml.add_bos_token`).
fn byte_level_bpe(ct: &Content, tokens: &[String]) -> Result<(Tokenizer, bool), EngineError> {
    let pre = md_string(ct, "tokenizer.ggml.pre")?.ok_or_else(|| {
        EngineError::Load("GGUF has no tokenizer.ggml.pre (pre-tokenizer unknown)".into())
    })?;
    // llama.cpp's families: Llama 3 takes a whole piece that is a vocabulary token as it is
    // ("ignore merges") and adds BOS by default.
    let (pre_tokenizer, ignore_merges, add_bos): (PreTokenizerWrapper, bool, bool) =
        match pre.as_str() {
            "smollm" => (
                Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])
                .into(),
                false,
                false,
            ),
            "qwen2" | "deepseek-r1-qwen" => (regex_then_bytes(QWEN2_SPLIT)?, false, false),
            "llama-bpe" | "llama3" | "llama-v3" => (regex_then_bytes(LLAMA3_SPLIT)?, true, true),
            other => {
                return Err(EngineError::Load(format!(
                    "unsupported pre-tokenizer tokenizer.ggml.pre = {other:?} for tokenizer model \"gpt2\" \
                     (supported: \"smollm\", \"qwen2\", \"llama-bpe\"); put the model's tokenizer.json \
                     beside the GGUF to use it"
                )))
            }
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
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| tok_err("building BPE", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    Ok((tokenizer, add_bos))
}

/// `tokenizer.ggml.model = llama`: SentencePiece (Llama 2, Phi-3, Gemma 3). llama.cpp merges
/// the adjacent pair whose joined piece has the highest score, leftmost first; the same result
/// comes from BPE with one merge per way of splitting a normal piece into two vocabulary
/// pieces, ranked by the piece's score, plus byte fallback for characters outside the
/// vocabulary. Spaces become "▁". With `tokenizer.ggml.add_space_prefix` (llama.cpp's default)
/// every run of text between special tokens gets a space in front, as llama.cpp writes it, and
/// decoding drops the first one.
fn sentencepiece(
    ct: &Content,
    tokens: &[String],
    types: Option<&[i32]>,
) -> Result<Tokenizer, EngineError> {
    if let Some(pre) = md_string(ct, "tokenizer.ggml.pre")?.filter(|p| p != "default") {
        return Err(EngineError::Load(format!(
            "unsupported pre-tokenizer tokenizer.ggml.pre = {pre:?} for tokenizer model \"llama\" \
             (supported: \"default\"); put the model's tokenizer.json beside the GGUF to use it"
        )));
    }
    let add_space_prefix = space_prefix(ct);
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
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) =
        md_u32(ct, "tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize))
    {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| tok_err("building the SentencePiece model", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let spaces = spaces_to_metaspace()?;
    let normalizer: tokenizers::NormalizerWrapper = if add_space_prefix {
        // Applied to each run of text between special tokens, which is where llama.cpp adds it.
        NormalizerSequence::new(vec![Prepend::new("\u{2581}".into()).into(), spaces.into()]).into()
    } else {
        spaces.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| tok_err("normalizer", e))?;
    let mut decoders = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| tok_err("decoder", e))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Whether a SentencePiece vocabulary puts a space before text (llama.cpp's default).
fn space_prefix(ct: &Content) -> bool {
    md(ct, "tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true)
}

/// SentencePiece's spelling of spaces: "▁".
fn spaces_to_metaspace() -> Result<Replace, EngineError> {
    Replace::new(" ", "\u{2581}").map_err(|e| tok_err("normalizer", e))
}

fn md_f32_array(ct: &Content, key: &str) -> Result<Vec<f32>, EngineError> {
    let v = md(ct, key).ok_or_else(|| EngineError::Load(format!("GGUF has no {key}")))?;
    let arr = v
        .to_vec()
        .map_err(|e| EngineError::Load(format!("metadata {key}: {e}")))?;
    arr.iter()
        .map(|x| {
            x.to_f32()
                .map_err(|e| EngineError::Load(format!("metadata {key}: {e}")))
        })
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
        // llama.cpp adds BOS by default for SentencePiece and some BPE families.
        let (mut tokenizer, spelling, default_bos) = match model.as_str() {
            "gpt2" => {
                let (t, bos) = byte_level_bpe(ct, &tokens)?;
                (t, Spelling::ByteLevel, bos)
            }
            "llama" => (
                sentencepiece(ct, &tokens, types.as_deref())?,
                Spelling::SentencePiece,
                true,
            ),
            other => {
                return Err(EngineError::Load(format!(
                    "unsupported tokenizer model tokenizer.ggml.model = {other:?} (supported: \"gpt2\", \"llama\")"
                )))
            }
        };

        // llama.cpp lets Phi-3's control tokens (by the model's name) swallow the whitespace
        // after them, but not <unk>, <s> and <|endoftext|>.
        let name = md_string(ct, "general.name")?
            .unwrap_or_default()
            .to_lowercase();
        let phi3 = name.contains("phi-3") || name.contains("phi3");
        let strips = |t: &str| phi3 && !matches!(t, "<unk>" | "<s>" | "<|endoftext|>");
        let mut rstrip = HashSet::new();
        let mut control_tokens = Vec::new();
        if let Some(types) = &types {
            let mut specials = Vec::new();
            let mut user_defined = Vec::new();
            for (id, (t, ty)) in tokens.iter().zip(types).enumerate() {
                let ty = if END_OF_GENERATION.contains(&t.as_str()) {
                    TOKEN_TYPE_CONTROL
                } else {
                    *ty
                };
                match ty {
                    TOKEN_TYPE_CONTROL => {
                        specials.push(AddedToken::from(t.clone(), true).rstrip(strips(t)));
                        control_tokens.push((t.clone(), id as u32));
                        if strips(t) {
                            rstrip.insert(id as u32);
                        }
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
        let fragment = if spelling == Spelling::SentencePiece && space_prefix(ct) {
            let mut f = plain.clone();
            f.with_normalizer(Some(spaces_to_metaspace()?))
                .map_err(|e| tok_err("normalizer", e))?;
            Some(f)
        } else {
            None
        };

        let n = tokens.len() as u32;
        let bos_id = md_u32(ct, "tokenizer.ggml.bos_token_id").filter(|&i| i < n);
        let eos_id = md_u32(ct, "tokenizer.ggml.eos_token_id").filter(|&i| i < n);
        let add_bos = md(ct, "tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(default_bos);

        let control_matcher = ControlMatcher::new(&control_tokens)?;
        Ok(Self {
            special,
            plain,
            fragment,
            control_tokens,
            control_matcher,
            tokens,
            spelling,
            bos_id,
            eos_id,
            add_bos,
            rstrip,
        })
    }

    /// The tokenizer of a `tokenizer.json` file (Hugging Face format) instead of the GGUF's
    /// metadata; BOS/EOS ids and `add_bos_token` still come from the GGUF. Its vocabulary must
    /// not be larger than the model's (`vocab_size`).
    pub(crate) fn from_tokenizer_json(
        path: &std::path::Path,
        ct: &Content,
        vocab_size: usize,
    ) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| tok_err(&format!("cannot read {}", path.display()), e))?;
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
        let control_matcher = ControlMatcher::new(&control_tokens)?;
        Ok(Self {
            special,
            plain,
            fragment: None,
            control_tokens,
            control_matcher,
            tokens,
            spelling: Spelling::Decoded,
            bos_id: md_u32(ct, "tokenizer.ggml.bos_token_id").filter(|&i| i < n),
            eos_id: md_u32(ct, "tokenizer.ggml.eos_token_id").filter(|&i| i < n),
            add_bos: md(ct, "tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            rstrip: HashSet::new(),
        })
    }

    /// Writes the tokenizer in Hugging Face's `tokenizer.json` format (tests and tools).
    #[cfg(test)]
    pub(crate) fn save_json(&self, path: &std::path::Path) -> Result<(), EngineError> {
        self.special
            .save(path, false)
            .map_err(|e| tok_err("saving tokenizer.json", e))
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
        let Some(piece) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
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
            Spelling::ByteLevel => match piece
                .chars()
                .map(byte_level_byte)
                .collect::<Option<Vec<u8>>>()
            {
                Some(bytes) => bytes,
                None => piece.as_bytes().to_vec(), // an added token spelled as plain text
            },
            Spelling::SentencePiece => {
                let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                match hex
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
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

    /// Whether control token `id` swallows the whitespace that follows it (Phi-3's, as in
    /// llama.cpp and the model's own `tokenizer.json`).
    pub(crate) fn strips_after(&self, id: u32) -> bool {
        self.rstrip.contains(&id)
    }

    /// Control token strings and ids.
    pub(crate) fn control_tokens(&self) -> &[(String, u32)] {
        &self.control_tokens
    }

    /// Encodes untrusted text: control-token strings in it become ordinary text tokens.
    pub(crate) fn encode_plain(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        encode_with(&self.plain, text)
    }

    /// Encodes untrusted text that continues other text (a grammar's forced bytes): as
    /// [`Self::encode_plain`], but without the space a SentencePiece vocabulary puts before a
    /// run of text, so the tokens spell exactly `text`.
    pub(crate) fn encode_fragment(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        encode_with(self.fragment.as_ref().unwrap_or(&self.plain), text)
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

    /// Finds the leftmost (then longest) control-token string in `text` at or after `from`, as
    /// `(start, length, id)`.
    #[cfg(test)]
    pub(crate) fn find_control(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        self.control_matcher.find(text, from)
    }

    /// Every control-token string in `text`, left to right, as `(start, length, id)`: the
    /// leftmost (then longest) match, then the same again after its end, in one pass.
    pub(crate) fn control_matches<'a>(
        &'a self,
        text: &'a str,
    ) -> impl Iterator<Item = (usize, usize, u32)> + 'a {
        self.control_matcher.find_all(text)
    }

    /// Whether `text` contains any control-token string.
    pub(crate) fn contains_control(&self, text: &str) -> bool {
        self.control_matcher.is_match(text)
    }
}

/// All control-token texts in one Aho-Corasick automaton (leftmost-longest), so that a text is
/// scanned once for every marker instead of once per control token per marker found (which made
/// encoding a long conversation quadratic).
struct ControlMatcher {
    automaton: AhoCorasick,
    /// Token id by pattern index.
    ids: Vec<u32>,
}

impl ControlMatcher {
    /// Builds the matcher over `control_tokens` (longest first, then by id, as
    /// [`GgufTokenizer`] keeps them). Empty texts never match; a text listed twice keeps its
    /// first id, the one the former per-token search reported.
    fn new(control_tokens: &[(String, u32)]) -> Result<Self, EngineError> {
        let mut seen = HashSet::new();
        let (patterns, ids): (Vec<&str>, Vec<u32>) = control_tokens
            .iter()
            .filter(|(t, _)| !t.is_empty() && seen.insert(t.as_str()))
            .map(|(t, id)| (t.as_str(), *id))
            .unzip();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| tok_err("building the control-token matcher", e))?;
        Ok(Self { automaton, ids })
    }

    #[cfg(test)]
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        count_scanned(text.len() - from);
        let input = aho_corasick::Input::new(text).span(from..text.len());
        self.automaton
            .find(input)
            .map(|m| (m.start(), m.len(), self.ids[m.pattern().as_usize()]))
    }

    fn find_all<'a>(&'a self, text: &'a str) -> impl Iterator<Item = (usize, usize, u32)> + 'a {
        #[cfg(test)]
        count_scanned(text.len());
        self.automaton
            .find_iter(text)
            .map(|m| (m.start(), m.len(), self.ids[m.pattern().as_usize()]))
    }

    fn is_match(&self, text: &str) -> bool {
        #[cfg(test)]
        count_scanned(text.len());
        self.automaton.is_match(text)
    }
}

#[cfg(test)]
thread_local! {
    /// Bytes of text this thread handed to control-token searches (tests count work with it).
    static SCANNED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
fn count_scanned(bytes: usize) {
    SCANNED.with(|s| s.set(s.get() + bytes));
}

/// Bytes of text this thread has searched for control tokens so far: a structural measure of
/// how often a text is rescanned.
#[cfg(test)]
pub(crate) fn scanned_bytes() -> usize {
    SCANNED.with(std::cell::Cell::get)
}

/// The per-token search the matcher replaced, kept as the reference it is tested against:
/// the leftmost occurrence of any control text at or after `from`, the longest at a tie.
#[cfg(test)]
pub(crate) fn find_control_reference(
    control_tokens: &[(String, u32)],
    text: &str,
    from: usize,
) -> Option<(usize, usize, u32)> {
    let mut best: Option<(usize, usize, u32)> = None;
    for (t, id) in control_tokens {
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

    /// A model's tokenizer from its GGUF metadata, built once per test binary; `None` (skip)
    /// when the file is missing, a failure under `BATCHLAB_REQUIRE_MODELS`.
    fn model_tokenizer(file: &'static str) -> Option<&'static GgufTokenizer> {
        crate::testing::test_gguf(file).map(|m| &m.tokenizer)
    }

    fn tokenizer() -> Option<&'static GgufTokenizer> {
        model_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    #[test]
    fn incremental_decoding_never_splits_characters() {
        let Some(tok) = tokenizer() else { return };
        let text = "Ünïcödé 日本語 🎉🚀 👨‍👩‍👧 ok";
        let ids = tok.encode_plain(text).unwrap();
        let mut dec = IncrementalDecoder::default();
        let mut out = String::new();
        for id in ids {
            let piece = dec.push(tok, id).unwrap();
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

    /// `control_tokens` sorted as [`GgufTokenizer`] keeps them (longest first, then by id).
    fn sorted(mut control_tokens: Vec<(String, u32)>) -> Vec<(String, u32)> {
        control_tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        control_tokens
    }

    /// The matcher against the per-token reference on `text`: the same match from every
    /// character boundary, and the same sequence of matches as calling the reference again
    /// after each one (what the chat encoder did).
    fn assert_matches_reference(
        matcher: &ControlMatcher,
        control_tokens: &[(String, u32)],
        text: &str,
        every_from: bool,
    ) {
        if every_from {
            for from in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                assert_eq!(
                    matcher.find(text, from),
                    find_control_reference(control_tokens, text, from),
                    "text {text:?} from {from}, tokens {control_tokens:?}"
                );
            }
        }
        let mut expected = Vec::new();
        let mut pos = 0;
        while let Some((start, len, id)) = find_control_reference(control_tokens, text, pos) {
            expected.push((start, len, id));
            pos = start + len;
        }
        assert_eq!(
            matcher.find_all(text).collect::<Vec<_>>(),
            expected,
            "text {text:?}, tokens {control_tokens:?}"
        );
        assert_eq!(matcher.is_match(text), !expected.is_empty());
    }

    #[test]
    fn control_matcher_equals_the_per_token_search_on_adversarial_tokens() {
        // Prefixes of each other, a shared suffix, a repeated text with two ids, an empty text.
        let tokens = sorted(
            [
                ("<|im_start|>", 1),
                ("<|im_end|>", 2),
                ("<|im", 7),
                ("<", 9),
                ("|>", 4),
                ("<|im_end|>", 3),
                ("", 5),
                ("im_", 6),
            ]
            .into_iter()
            .map(|(t, id)| (t.to_string(), id))
            .collect(),
        );
        let matcher = ControlMatcher::new(&tokens).unwrap();
        for text in [
            "",
            "plain text",
            "<|im<|im_start|><<|im_end|>|>",
            "<|im_start|<|im_end|<|im_start|>user\n<|im_end|>",
            "<<<<|||>>>|>|>",
            "é<|imé<|im_end|>é",
            "im_im_<|im_",
        ] {
            assert_matches_reference(&matcher, &tokens, text, true);
        }
        // No control tokens at all: nothing ever matches.
        let none = ControlMatcher::new(&[]).unwrap();
        assert_matches_reference(&none, &[], "<|im_start|>", true);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 64, ..Default::default() })]

        /// Random token sets over a tiny alphabet (so that tokens overlap, nest and repeat)
        /// against random texts over the same alphabet.
        #[test]
        fn control_matcher_equals_the_per_token_search_on_random_tokens(
            tokens in proptest::collection::vec(("[<|ab>é]{0,4}", 0u32..12), 0..8),
            text in "[<|ab>é ]{0,48}",
        ) {
            let tokens = sorted(tokens);
            let matcher = ControlMatcher::new(&tokens).unwrap();
            assert_matches_reference(&matcher, &tokens, &text, true);
        }

        /// The real models' control tokens (Gemma 3 has hundreds) on texts made of them, their
        /// pieces and noise.
        #[test]
        fn control_matcher_equals_the_per_token_search_on_the_models_tokens(
            picks in proptest::collection::vec((0usize..10_000, 0usize..4, "[<|_a-z>\n ]{0,3}"), 0..12),
        ) {
            for file in ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"] {
                let Some(tok) = model_tokenizer(file) else { continue };
                let tokens = tok.control_tokens();
                let mut text = String::new();
                for (i, cut, noise) in &picks {
                    let t = &tokens[i % tokens.len()].0;
                    // The whole token, or a prefix of it cut at a character boundary.
                    let end = (0..=t.len()).rev().filter(|&e| t.is_char_boundary(e)).nth(*cut).unwrap_or(0);
                    text.push_str(&t[..end]);
                    text.push_str(noise);
                }
                assert_matches_reference(&tok.control_matcher, tokens, &text, false);
                assert_eq!(tok.find_control(&text, 0), find_control_reference(tokens, &text, 0));
            }
        }
    }
}
