//! Chat template rendering (the GGUF's `tokenizer.chat_template`, a Jinja template) and safe
//! prompt encoding.
//!
//! Templates are rendered the way Hugging Face `transformers` renders them: Jinja with
//! `trim_blocks` and `lstrip_blocks`, Python string methods (`.strip()`, `.startswith()`, ...)
//! through minijinja-contrib's pycompat, and a `raise_exception` function.

use std::hash::{BuildHasher, Hasher};

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use crate::tokenizer::GgufTokenizer;
use crate::{ChatMessage, EngineError};

/// ChatML, used when a GGUF carries no chat template.
pub(crate) const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Gemma's turn format, used when a GGUF with Gemma's turn markers carries no chat template
/// (Gemma 3 base models): a system message opens the first user turn, as Gemma's own template
/// does, and the assistant is the "model".
pub(crate) const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% set ns = namespace(system='') %}\
{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\n\n' %}\
{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + ns.system + message['content'] + '<end_of_turn>\n' }}\
{% set ns.system = '' %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// A compiled chat template plus the values it is rendered with.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; errors are load errors (the template comes from the model file).
    pub(crate) fn new(
        source: &str,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::Load(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders the conversation with `add_generation_prompt = true`.
    pub(crate) fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            EngineError::Template(msg)
        })
    }

    /// Renders and tokenizes a conversation so that only the template's own text can produce
    /// control tokens.
    ///
    /// The template is rendered once with every message content replaced by a unique
    /// placeholder (the "skeleton"). Control-token strings are matched in the skeleton only;
    /// the text between them, with the real contents substituted back, is encoded with control
    /// token matching disabled. The result equals what encoding the real render with control
    /// tokens would give, except that control-token strings typed inside a message stay text.
    ///
    /// If the template changes message contents (e.g. `content | trim`), substitution no longer
    /// reproduces the real render; then the real render is encoded with control tokens, which is
    /// safe only when no content contains a control-token string, so such requests are refused.
    pub(crate) fn encode(
        &self,
        tok: &GgufTokenizer,
        messages: &[ChatMessage],
    ) -> Result<Vec<u32>, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidRequest(
                "messages must not be empty".into(),
            ));
        }
        for m in messages {
            if tok.contains_control(&m.role) {
                return Err(EngineError::InvalidRequest(format!(
                    "message role {:?} contains a control token",
                    m.role
                )));
            }
        }
        let real = self.render(messages)?;

        // A marker that no content contains, so placeholders are unambiguous.
        let marker = loop {
            let nonce = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let m = format!("\u{E000}ph{nonce:016x}_");
            if !messages.iter().any(|msg| msg.content.contains(&m)) {
                break m;
            }
        };
        let placeholder = |i: usize| format!("{marker}{i}\u{E001}");
        let skeleton_msgs: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role.clone(),
                content: placeholder(i),
            })
            .collect();
        let skeleton = self.render(&skeleton_msgs)?;
        let substitute = |s: &str| -> String {
            let mut out = String::with_capacity(s.len());
            let mut rest = s;
            while let Some(pos) = rest.find(&marker) {
                out.push_str(&rest[..pos]);
                let after = &rest[pos + marker.len()..];
                let end = after.find('\u{E001}');
                let idx = end.and_then(|e| after[..e].parse::<usize>().ok());
                match (end, idx) {
                    (Some(e), Some(i)) if i < messages.len() => {
                        out.push_str(&messages[i].content);
                        rest = &after[e + '\u{E001}'.len_utf8()..];
                    }
                    _ => {
                        // Not one of ours (cannot happen with the checked marker); keep as text.
                        out.push_str(&marker);
                        rest = after;
                    }
                }
            }
            out.push_str(rest);
            out
        };

        if substitute(&skeleton) != real {
            if messages.iter().any(|m| tok.contains_control(&m.content)) {
                return Err(EngineError::InvalidRequest(
                    "a message contains a control token string and this model's chat template \
                     rewrites message contents, so it cannot be encoded safely"
                        .into(),
                ));
            }
            return tok.encode_trusted(&real);
        }

        let mut ids = Vec::new();
        let mut pos = 0;
        while pos < skeleton.len() {
            match tok.find_control(&skeleton, pos) {
                Some((start, len, id)) => {
                    ids.extend(tok.encode_plain(&substitute(&skeleton[pos..start]))?);
                    ids.push(id);
                    pos = start + len;
                }
                None => {
                    ids.extend(tok.encode_plain(&substitute(&skeleton[pos..]))?);
                    pos = skeleton.len();
                }
            }
        }
        Ok(ids)
    }
}
