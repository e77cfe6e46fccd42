//! Constrained decoding (structured output) with llguidance.
//!
//! A [`Constraint`] (a JSON schema, any JSON object, a regular expression, a closed set of
//! strings or a Lark grammar) is compiled, on the caller's thread, into a [`Guide`]: a token
//! parser over the engine's own vocabulary. At every step the model thread asks the guide which
//! tokens may come next and sets every other logit to minus infinity before sampling, so even
//! a 135M model's text always parses. A guide whose grammar is complete ends its sequence.

use std::collections::HashSet;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::GgufTokenizer;
use crate::EngineError;

/// What generated text must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Constraint {
    /// A JSON value valid against this JSON schema (OpenAI's `response_format` `json_schema`).
    /// Unless the schema says otherwise (llguidance's `x-guidance` options), the JSON is
    /// written on one line with `", "` and `": "` separators, so a small model cannot wander
    /// off into endless whitespace.
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `response_format` `json_object`).
    JsonObject,
    /// A match of this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A sentence of this grammar in llguidance's Lark dialect.
    Lark(String),
}

impl Constraint {
    /// The llguidance grammar for this constraint.
    fn grammar(&self) -> Result<TopLevelGrammar, EngineError> {
        Ok(match self {
            Constraint::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    if !obj.contains_key("x-guidance") {
                        let options = JsonCompileOptions {
                            item_separator: ", ".into(),
                            key_separator: ": ".into(),
                            whitespace_flexible: false,
                            ..JsonCompileOptions::default()
                        };
                        options.apply_to(&mut schema);
                    }
                } else if !schema.is_boolean() {
                    return Err(invalid("a JSON schema must be an object or a boolean"));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::JsonObject => {
                return Constraint::JsonSchema(serde_json::json!({"type": "object"})).grammar();
            }
            Constraint::Regex(rx) => {
                regex_syntax::Parser::new()
                    .parse(rx)
                    .map_err(|e| invalid(format!("invalid regular expression: {e}")))?;
                TopLevelGrammar::from_regex(rx)
            }
            Constraint::Choice(options) => {
                if options.is_empty() || options.iter().any(String::is_empty) {
                    return Err(invalid(
                        "a choice constraint needs at least one option, none of them empty",
                    ));
                }
                let alternatives: Vec<String> =
                    options.iter().map(|o| regex_syntax::escape(o)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Constraint::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        })
    }
}

fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest(message.into())
}

/// The engine's vocabulary as llguidance sees it: each token's bytes (control tokens marked
/// with toktrie's 0xFF prefix, so no grammar can produce them) and the engine's tokenizer.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<GgufTokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s)
            .ok()
            .and_then(|text| self.tokenizer.encode_fragment(text).ok())
        {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles constraints for one loaded model; built once at load.
pub(crate) struct Guidance {
    factory: ParserFactory,
    /// The end-of-sequence token llguidance allows when a grammar is complete.
    eos: TokenId,
    /// Every token that ends a generation; all of them are allowed where `eos` is.
    all_eos: Vec<TokenId>,
}

impl Guidance {
    /// Builds the token trie and llguidance's parser factory for `tokenizer`. `eos` holds the
    /// tokens that end a generation; `end_of_turn` (or else the lowest of them) is the one
    /// llguidance reasons about.
    pub(crate) fn new(
        tokenizer: Arc<GgufTokenizer>,
        eos: &HashSet<u32>,
        end_of_turn: Option<u32>,
    ) -> Result<Self, EngineError> {
        let mut all_eos: Vec<u32> = eos.iter().copied().collect();
        all_eos.sort_unstable();
        let tok_eos = end_of_turn
            .or_else(|| all_eos.first().copied())
            .ok_or_else(|| {
                EngineError::Load("structured output needs an end-of-sequence token".into())
            })?;
        let words = tokenizer.vocabulary_bytes(TokTrie::SPECIAL_TOKEN_MARKER);
        let mut info = TokRxInfo::new(words.len() as u32, tok_eos);
        info.tok_bos = tokenizer.bos_id;
        info.tok_end_of_turn = end_of_turn;
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| EngineError::Load(format!("structured output: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory,
            eos: tok_eos,
            all_eos,
        })
    }

    /// Compiles `constraint` into a fresh guide; a schema, regex or grammar llguidance cannot
    /// compile is [`EngineError::InvalidRequest`] with its reason.
    pub(crate) fn guide(&self, constraint: &Constraint) -> Result<Guide, EngineError> {
        let grammar = constraint.grammar()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(format!("cannot compile the output constraint: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(format!(
                "cannot compile the output constraint: {e}"
            )));
        }
        Ok(Guide {
            matcher: Box::new(matcher),
            eos: self.eos,
            all_eos: self.all_eos.clone(),
        })
    }
}

/// One sequence's position in its grammar.
pub(crate) struct Guide {
    /// Boxed: llguidance's matcher is large, and guides travel in the request queue.
    matcher: Box<Matcher>,
    eos: TokenId,
    all_eos: Vec<TokenId>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Guide {
    /// Sets the logit of every token the grammar does not allow next to minus infinity
    /// (ending the sequence is allowed exactly where the grammar is complete).
    pub(crate) fn mask(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let allowed = self.matcher.compute_mask().map_err(|e| grammar_error(&e))?;
        let eos_allowed = allowed.is_allowed(self.eos);
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as TokenId;
            let ok = if self.all_eos.contains(&id) {
                eos_allowed
            } else {
                id < allowed.len() as u32 && allowed.is_allowed(id)
            };
            if !ok {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past a generated (allowed, not end-of-sequence) token; true when the grammar
    /// is complete and allows nothing more.
    pub(crate) fn advance(&mut self, token: TokenId) -> Result<bool, EngineError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| grammar_error(&e))?;
        Ok(self.matcher.is_stopped())
    }
}

fn grammar_error(e: &impl std::fmt::Display) -> EngineError {
    EngineError::Inference(format!("structured output failed: {e}"))
}
