//! OpenAI requests in the engine's terms and the engine's results in OpenAI's: a batch line or a
//! Chat Completions body becomes an [`EngineCall`] (validated and bounded by [`BodyLimits`]), and a
//! [`Completion`] becomes a chat or text completion object ([`EngineCall::run`] does both ways;
//! embeddings are in [`crate::embeddings`]).

use std::collections::HashSet;

use batchlab_core::config::EngineSettings;
use batchlab_core::error::InvalidInput;
use batchlab_core::openai::new_id;
use batchlab_engine::{
    ChatMessage, ChatRequest, Completion, CompletionRequest, Constraint, Engine, EngineError,
    FinishReason, SamplingParams, TopLogprob,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::embeddings::{self, EmbeddingsRequest};

/// Why one line of a batch input file cannot run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    /// Machine-readable code, e.g. `invalid_json_line`.
    pub code: &'static str,
    /// Human explanation.
    pub message: String,
    /// The line's `custom_id`, when it could be read.
    pub custom_id: Option<String>,
}

impl LineError {
    fn new(code: &'static str, message: impl Into<String>, custom_id: Option<String>) -> Self {
        Self {
            code,
            message: message.into(),
            custom_id,
        }
    }
}

/// A validated batch input line, ready for the engine.
#[derive(Clone, Debug)]
pub struct RequestLine {
    /// The client's id for this request, unique in the file.
    pub custom_id: String,
    /// What to run.
    pub request: EngineCall,
    /// The model the client named (answered by the loaded model regardless).
    pub model: Option<String>,
}

/// A request in the engine's own terms.
#[derive(Clone, Debug)]
pub enum EngineCall {
    /// `/v1/chat/completions`.
    Chat(ChatRequest),
    /// `/v1/completions`.
    Completion(CompletionRequest),
    /// `/v1/embeddings`.
    Embeddings(EmbeddingsRequest),
}

/// What an [`EngineCall`] answered: OpenAI's response object and the tokens it took.
#[derive(Clone, Debug, PartialEq)]
pub struct CallAnswer {
    /// The response body (`chat.completion`, `text_completion` or an embeddings `list`).
    pub body: Value,
    /// Prompt tokens read.
    pub input_tokens: usize,
    /// Of those, the tokens served from the engine's prompt cache.
    pub cached_tokens: usize,
    /// Tokens generated (0 for embeddings).
    pub output_tokens: usize,
}

impl EngineCall {
    /// Runs the call on `engine` and answers OpenAI's response object, named after the loaded
    /// model.
    pub async fn run(&self, engine: &Engine) -> Result<CallAnswer, EngineError> {
        let model = engine.model_id();
        let created = batchlab_core::store::now();
        let completion = |c: Completion, body: Value| CallAnswer {
            input_tokens: c.prompt_tokens,
            cached_tokens: c.cached_tokens,
            output_tokens: c.completion_tokens,
            body,
        };
        Ok(match self {
            EngineCall::Chat(r) => {
                let c = engine.chat(r.clone()).await?;
                let body = chat_completion_object(&new_id("chatcmpl-"), model, created, &c);
                completion(c, body)
            }
            EngineCall::Completion(r) => {
                let c = engine.complete(r.clone()).await?;
                let body = text_completion_object(&new_id("cmpl-"), model, created, &c);
                completion(c, body)
            }
            EngineCall::Embeddings(r) => {
                let vectors = embeddings::embed(engine, r).await?;
                CallAnswer {
                    body: embeddings::embeddings_object(model, r.encoding, &vectors),
                    input_tokens: embeddings::prompt_tokens(&vectors),
                    cached_tokens: 0,
                    output_tokens: 0,
                }
            }
        })
    }
}

/// Defaults and bounds applied while parsing a request body (a batch line's or the ML
/// backend's): they keep one request from asking the engine for unbounded work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLimits {
    /// `max_tokens` for bodies that set none (capped at `max_tokens_limit`).
    pub default_max_tokens: usize,
    /// Largest `max_tokens` / `max_completion_tokens` a body may ask for; more is refused.
    pub max_tokens_limit: usize,
    /// Most chat `messages` one body may hold; more is refused before any is converted.
    pub max_messages: usize,
}

impl BodyLimits {
    /// The limits the engine settings configure (`[engine]` in the configuration).
    pub fn from_settings(settings: &EngineSettings) -> BodyLimits {
        BodyLimits {
            default_max_tokens: settings.default_max_tokens,
            max_tokens_limit: settings.max_tokens_limit,
            max_messages: settings.max_messages,
        }
    }
}

impl Default for BodyLimits {
    /// The limits of the default configuration.
    fn default() -> Self {
        BodyLimits::from_settings(&EngineSettings::default())
    }
}

/// Validates one input line against the batch's endpoint. `seen` collects `custom_id`s so a
/// duplicate is caught; `limits` supply the default `max_tokens` and bound the body.
///
/// A `custom_id` holding U+0000 is refused (`invalid_custom_id`): PostgreSQL text cannot store
/// it, and OpenAI would reject such an input as invalid too.
pub fn parse_request_line(
    line: &str,
    endpoint: &str,
    seen: &mut HashSet<String>,
    limits: &BodyLimits,
) -> Result<RequestLine, LineError> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        LineError::new(
            "invalid_json_line",
            format!("line is not valid JSON: {e}"),
            None,
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(LineError::new(
            "invalid_json_line",
            "line must be a JSON object",
            None,
        ));
    };
    let custom_id = match obj.remove("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => {
            return Err(LineError::new(
                "missing_custom_id",
                "line has no string custom_id",
                None,
            ))
        }
    };
    let cid = Some(custom_id.clone());
    if custom_id.contains('\0') {
        return Err(LineError::new(
            "invalid_custom_id",
            "custom_id must not contain the NUL character (U+0000)",
            cid,
        ));
    }
    if seen.contains(&custom_id) {
        return Err(LineError::new(
            "duplicate_custom_id",
            format!("custom_id {custom_id:?} appears more than once"),
            cid,
        ));
    }
    match obj.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        other => {
            return Err(LineError::new(
                "invalid_method",
                format!("method must be \"POST\", got {other:?}"),
                cid,
            ));
        }
    }
    let url = obj.get("url").and_then(Value::as_str).unwrap_or_default();
    if url != endpoint {
        return Err(LineError::new(
            "mismatched_url",
            format!("url {url:?} differs from the batch's endpoint {endpoint:?}"),
            cid,
        ));
    }
    let body = obj.remove("body").unwrap_or(Value::Null);
    let parsed = match endpoint {
        "/v1/chat/completions" => parse_chat_body(body, limits),
        "/v1/completions" => parse_completion_body(body, limits),
        "/v1/embeddings" => embeddings::parse_embeddings_body(body)
            .map(|r| (r.model.clone(), EngineCall::Embeddings(r)))
            .map(|(model, call)| (call, model)),
        other => Err(InvalidInput(format!("unsupported endpoint {other}"))),
    };
    let (request, model) =
        parsed.map_err(|e| LineError::new("invalid_body", e.into_message(), cid.clone()))?;
    seen.insert(custom_id.clone());
    Ok(RequestLine {
        custom_id,
        request,
        model,
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct SamplingFields {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<StopField>,
    n: Option<u64>,
    stream: Option<bool>,
    /// Chat: a boolean; completions: how many alternatives per token (0 to 5).
    logprobs: Option<Value>,
    /// Chat: alternatives per token (0 to 20), with `logprobs: true`.
    top_logprobs: Option<u64>,
    /// OpenAI's structured output: `{"type": "text" | "json_object" | "json_schema", ...}`.
    response_format: Option<Value>,
    /// vLLM's structured-output fields, for clients written against vLLM.
    guided_json: Option<Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,
    /// vLLM's newer spelling of the same: `{"json" | "regex" | "choice" | "grammar": ...}`.
    structured_outputs: Option<Value>,
}

/// Which OpenAI endpoint a body is for (their `logprobs` fields differ).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

impl SamplingFields {
    /// `Some(k)`: record log-probabilities with `k` alternatives per token.
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, String> {
        match endpoint {
            Endpoint::Chat => {
                let on = match &self.logprobs {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => return Err(format!("logprobs must be a boolean, got {other}")),
                };
                match self.top_logprobs {
                    Some(k) if k > batchlab_engine::MAX_TOP_LOGPROBS as u64 => Err(format!(
                        "top_logprobs must be between 0 and {}, got {k}",
                        batchlab_engine::MAX_TOP_LOGPROBS
                    )),
                    Some(_) if !on => Err("top_logprobs requires logprobs to be true".into()),
                    k => Ok(on.then_some(k.unwrap_or(0) as usize)),
                }
            }
            Endpoint::Completions => match &self.logprobs {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(k) if k <= 5 => Ok(Some(k as usize)),
                    _ => Err(format!(
                        "logprobs must be an integer between 0 and 5, got {v}"
                    )),
                },
            },
        }
    }

    /// The output constraint the body asks for: OpenAI's `response_format`, or vLLM's
    /// `guided_*` fields or `structured_outputs` object; at most one of them.
    fn constraint(&self) -> Result<Option<Constraint>, String> {
        let mut found: Vec<(&str, Constraint)> = Vec::new();
        match &self.response_format {
            None | Some(Value::Null) => {}
            Some(rf) => match rf.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some("json_object") => found.push(("response_format", Constraint::JsonObject)),
                Some("json_schema") => {
                    let schema = rf
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .ok_or("response_format.json_schema.schema is required for type json_schema")?;
                    found.push(("response_format", Constraint::JsonSchema(json_schema(schema, "response_format.json_schema.schema")?)));
                }
                other => {
                    return Err(format!(
                        "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {}",
                        other.map_or_else(|| "nothing".to_string(), |t| format!("{t:?}"))
                    ))
                }
            },
        }
        if let Some(schema) = &self.guided_json {
            found.push((
                "guided_json",
                Constraint::JsonSchema(json_schema(schema, "guided_json")?),
            ));
        }
        if let Some(rx) = &self.guided_regex {
            found.push(("guided_regex", Constraint::Regex(rx.clone())));
        }
        if let Some(options) = &self.guided_choice {
            found.push(("guided_choice", Constraint::Choice(options.clone())));
        }
        if let Some(grammar) = &self.guided_grammar {
            found.push(("guided_grammar", Constraint::Lark(grammar.clone())));
        }
        match &self.structured_outputs {
            None | Some(Value::Null) => {}
            Some(Value::Object(so)) => {
                for (key, value) in so {
                    let c = match (key.as_str(), value) {
                        (_, Value::Null) => continue,
                        ("json", schema) => Constraint::JsonSchema(json_schema(schema, "structured_outputs.json")?),
                        ("json_object", Value::Bool(true)) => Constraint::JsonObject,
                        ("regex", Value::String(rx)) => Constraint::Regex(rx.clone()),
                        ("choice", Value::Array(options)) => Constraint::Choice(
                            options
                                .iter()
                                .map(|o| o.as_str().map(str::to_string))
                                .collect::<Option<_>>()
                                .ok_or("structured_outputs.choice must be an array of strings")?,
                        ),
                        ("grammar", Value::String(g)) => Constraint::Lark(g.clone()),
                        (key, _) => return Err(format!("structured_outputs.{key} is not supported (json, json_object, regex, choice, grammar)")),
                    };
                    found.push(("structured_outputs", c));
                }
            }
            Some(_) => return Err("structured_outputs must be an object".into()),
        }
        match found.len() {
            0 | 1 => Ok(found.pop().map(|(_, c)| c)),
            _ => Err(format!(
                "give one output constraint, not several: {}",
                found
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn into_params(
        self,
        limits: &BodyLimits,
        endpoint: Endpoint,
    ) -> Result<(SamplingParams, Option<String>), String> {
        let logprobs = self.logprobs(endpoint)?;
        let constraint = self.constraint()?;
        if self.stream == Some(true) {
            return Err("stream must not be true in a batch".into());
        }
        if self.n.unwrap_or(1) != 1 {
            return Err("only n = 1 is supported".into());
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!(
                "temperature must be between 0 and 2, got {temperature}"
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        for (field, asked) in [
            ("max_completion_tokens", self.max_completion_tokens),
            ("max_tokens", self.max_tokens),
        ] {
            match asked {
                Some(n) if n > limits.max_tokens_limit as u64 => {
                    return Err(format!(
                        "{field} {n} exceeds this server's limit of {}",
                        limits.max_tokens_limit
                    ));
                }
                _ => {}
            }
        }
        let default = limits.default_max_tokens.min(limits.max_tokens_limit);
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .map(|m| m as usize)
            .unwrap_or(default);
        if max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        let stop = match self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) if v.len() <= 4 => v,
            Some(StopField::Many(_)) => return Err("stop may hold at most 4 sequences".into()),
        };
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let params = SamplingParams {
            max_tokens: Some(max_tokens),
            temperature,
            top_p: self.top_p,
            seed: self.seed.map(|s| s as u64),
            stop,
            logprobs,
            constraint,
        };
        Ok((params, self.model))
    }
}

/// A JSON schema as a body gives it: an object (or a boolean), or the same as a JSON string.
fn json_schema(value: &Value, field: &str) -> Result<Value, String> {
    let schema = match value {
        Value::String(text) => {
            serde_json::from_str(text).map_err(|e| format!("{field} is not valid JSON: {e}"))?
        }
        other => other.clone(),
    };
    if schema.is_object() || schema.is_boolean() {
        Ok(schema)
    } else {
        Err(format!("{field} must be a JSON schema object"))
    }
}

/// A message's text, moved out of the parsed body (the text is not copied when it is one string
/// or one text part).
fn message_content(content: Value) -> Result<String, String> {
    match content {
        Value::String(s) => Ok(s),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for mut part in parts {
                let part_text = part.get_mut("text").map(Value::take);
                match (part.get("type").and_then(Value::as_str), part_text) {
                    (Some("text"), Some(Value::String(t))) if text.is_empty() => text = t,
                    (Some("text"), Some(Value::String(t))) => text.push_str(&t),
                    (kind, _) => {
                        return Err(format!(
                            "content part of type {kind:?} is not supported; only text"
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err("message content must be a string or an array of text parts".into()),
    }
}

/// Validates a `/v1/chat/completions` body, moving the message texts out of it. At most
/// `limits.max_messages` messages are accepted, and `max_tokens` is bounded (see [`BodyLimits`]).
pub fn parse_chat_body(
    body: Value,
    limits: &BodyLimits,
) -> Result<(EngineCall, Option<String>), InvalidInput> {
    let (request, model) = parse_chat_request(body, limits)?;
    Ok((EngineCall::Chat(request), model))
}

/// [`parse_chat_body`] for callers that serve chat only (the ML backend's
/// `/v1/chat/completions`): the engine's chat request and the model the client named.
pub fn parse_chat_request(
    body: Value,
    limits: &BodyLimits,
) -> Result<(ChatRequest, Option<String>), InvalidInput> {
    chat_request(body, limits).map_err(InvalidInput)
}

fn chat_request(
    mut body: Value,
    limits: &BodyLimits,
) -> Result<(ChatRequest, Option<String>), String> {
    let Some(obj) = body.as_object_mut() else {
        return Err("body must be a JSON object".into());
    };
    let Some(Value::Array(messages)) = obj.remove("messages") else {
        return Err("body.messages must be an array".into());
    };
    if messages.is_empty() {
        return Err("body.messages must not be empty".into());
    }
    if messages.len() > limits.max_messages {
        return Err(format!(
            "body.messages holds {} messages; this server accepts {} at most",
            messages.len(),
            limits.max_messages
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, mut m) in messages.into_iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or(format!("messages[{i}].role is missing"))?;
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(format!("messages[{i}].role {role:?} is not a known role"));
        }
        let role = if role == "developer" { "system" } else { role }.to_string();
        let content = m.get_mut("content").map(Value::take).unwrap_or(Value::Null);
        let content = message_content(content).map_err(|e| format!("messages[{i}]: {e}"))?;
        out.push(ChatMessage { role, content });
    }
    let fields: SamplingFields =
        serde_json::from_value(body).map_err(|e| format!("invalid body: {e}"))?;
    let (params, model) = fields.into_params(limits, Endpoint::Chat)?;
    Ok((
        ChatRequest {
            messages: out,
            params,
        },
        model,
    ))
}

/// Validates a `/v1/completions` body, moving the prompt out of it; `max_tokens` is bounded
/// (see [`BodyLimits`]).
pub fn parse_completion_body(
    body: Value,
    limits: &BodyLimits,
) -> Result<(EngineCall, Option<String>), InvalidInput> {
    completion_request(body, limits).map_err(InvalidInput)
}

fn completion_request(
    mut body: Value,
    limits: &BodyLimits,
) -> Result<(EngineCall, Option<String>), String> {
    let prompt = match body.as_object_mut().and_then(|o| o.remove("prompt")) {
        Some(Value::String(s)) => s,
        Some(Value::Array(mut a)) if a.len() == 1 && a[0].is_string() => match a.pop() {
            Some(Value::String(s)) => s,
            _ => unreachable!("checked to be one string"),
        },
        Some(Value::Array(_)) => {
            return Err("prompt must be one string (arrays of prompts are not supported)".into())
        }
        _ => return Err("body.prompt must be a string".into()),
    };
    let fields: SamplingFields =
        serde_json::from_value(body).map_err(|e| format!("invalid body: {e}"))?;
    let (params, model) = fields.into_params(limits, Endpoint::Completions)?;
    Ok((
        EngineCall::Completion(CompletionRequest { prompt, params }),
        model,
    ))
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    })
}

/// A token as OpenAI spells it: its text (lossy where it holds part of a character) and bytes.
fn token_text(t: &TopLogprob) -> String {
    String::from_utf8_lossy(&t.bytes).into_owned()
}

/// `choices[].logprobs` of a chat completion: `{content: [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(c: &Completion) -> Value {
    let Some(tokens) = &c.logprobs else {
        return Value::Null;
    };
    let entry =
        |t: &TopLogprob| json!({"token": token_text(t), "logprob": t.logprob, "bytes": t.bytes});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.token);
            e["top_logprobs"] = t.top.iter().map(entry).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// `choices[].logprobs` of a legacy completion: parallel `tokens`, `token_logprobs`,
/// `top_logprobs` (text to log-probability) and `text_offset` (in characters, as OpenAI counts).
fn completion_logprobs(c: &Completion) -> Value {
    let Some(tokens) = &c.logprobs else {
        return Value::Null;
    };
    let char_offset = |byte: usize| {
        c.text
            .get(..byte)
            .map_or(c.text.chars().count(), |s| s.chars().count())
    };
    json!({
        "tokens": tokens.iter().map(|t| token_text(&t.token)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|t| t.top.iter().map(|a| (token_text(a), json!(a.logprob))).collect::<serde_json::Map<_, _>>())
            .collect::<Vec<_>>(),
        "text_offset": tokens.iter().map(|t| char_offset(t.text_offset)).collect::<Vec<_>>(),
    })
}

/// The `chat.completion` object for an engine result.
pub fn chat_completion_object(id: &str, model: &str, created: i64, c: &Completion) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text, "refusal": null},
            "logprobs": chat_logprobs(c),
            "finish_reason": finish_reason(c.finish_reason),
        }],
        "usage": usage(c),
        "system_fingerprint": null,
    })
}

/// The `text_completion` object for an engine result.
pub fn text_completion_object(id: &str, model: &str, created: i64, c: &Completion) -> Value {
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": c.text, "logprobs": completion_logprobs(c), "finish_reason": finish_reason(c.finish_reason)}],
        "usage": usage(c),
    })
}

/// How a failed engine request is answered over HTTP: the status, OpenAI's error `type` and a
/// code. The one mapping for a batch's output file and for the ML backend's routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineFailure {
    /// The HTTP status.
    pub status: u16,
    /// OpenAI's error type.
    pub kind: &'static str,
    /// A machine-readable code.
    pub code: &'static str,
}

impl EngineFailure {
    /// The answer to `e`: the request's own fault is a 4xx, a full queue 429, the rest 500.
    pub fn of(e: &EngineError) -> EngineFailure {
        let (status, kind, code) = match e {
            EngineError::InvalidRequest(_) | EngineError::Template(_) => {
                (400, "invalid_request_error", "invalid_request")
            }
            EngineError::Overloaded => (429, "rate_limit_error", "overloaded"),
            EngineError::Load(_) | EngineError::Stopped | EngineError::Inference(_) => {
                (500, "server_error", "engine_error")
            }
        };
        EngineFailure { status, kind, code }
    }

    /// Whether the request itself is at fault (a 4xx), so the engine's message is the client's.
    pub fn is_client_error(&self) -> bool {
        (400..500).contains(&self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BodyLimits {
        BodyLimits {
            default_max_tokens: 16,
            max_tokens_limit: 4096,
            max_messages: 8,
        }
    }

    fn parse(line: &str, seen: &mut HashSet<String>) -> Result<RequestLine, LineError> {
        parse_request_line(line, "/v1/chat/completions", seen, &limits())
    }

    #[test]
    fn a_good_chat_line_becomes_an_engine_request() {
        let mut seen = HashSet::new();
        let line = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_completion_tokens":7,"temperature":0,"stop":"\n","seed":3}}"#;
        let r = parse(line, &mut seen).unwrap();
        assert_eq!(r.custom_id, "a");
        assert_eq!(r.model.as_deref(), Some("m"));
        let EngineCall::Chat(chat) = r.request else {
            panic!("chat expected")
        };
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(chat.messages[1].content, "Hi");
        assert_eq!(chat.params.max_tokens, Some(7));
        assert_eq!(chat.params.temperature, 0.0);
        assert_eq!(chat.params.stop, vec!["\n".to_string()]);
        assert_eq!(chat.params.seed, Some(3));
    }

    #[test]
    fn bad_lines_get_specific_codes() {
        let mut seen = HashSet::new();
        let ok = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}]}}"#;
        parse(ok, &mut seen).unwrap();
        let cases = [
            ("{not json", "invalid_json_line"),
            ("[1]", "invalid_json_line"),
            (r#"{"method":"POST"}"#, "missing_custom_id"),
            (ok, "duplicate_custom_id"),
            (
                r#"{"custom_id":"b","method":"GET","url":"/v1/chat/completions","body":{}}"#,
                "invalid_method",
            ),
            (
                r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":{}}"#,
                "mismatched_url",
            ),
            (
                r#"{"custom_id":"d","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}"#,
                "invalid_body",
            ),
            (
                r#"{"custom_id":"e","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}],"stream":true}}"#,
                "invalid_body",
            ),
            (
                r#"{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}],"temperature":3}}"#,
                "invalid_body",
            ),
        ];
        for (line, code) in cases {
            assert_eq!(parse(line, &mut seen).unwrap_err().code, code, "{line}");
        }
        // A rejected line does not reserve its custom_id.
        assert!(parse(r#"{"custom_id":"d","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}]}}"#, &mut seen).is_ok());
    }

    #[test]
    fn completion_bodies_take_one_prompt() {
        let (call, _) =
            parse_completion_body(json!({"prompt": ["Once"], "max_tokens": 5}), &limits()).unwrap();
        let EngineCall::Completion(c) = call else {
            panic!()
        };
        assert_eq!(c.prompt, "Once");
        assert!(parse_completion_body(json!({"prompt": ["a", "b"]}), &limits()).is_err());
    }

    /// A batch for `/v1/embeddings` reads each line's body as an embeddings request.
    #[test]
    fn embeddings_lines_are_read_for_an_embeddings_batch() {
        let mut seen = HashSet::new();
        let line = r#"{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":["a","b"],"encoding_format":"base64"}}"#;
        let parsed = parse_request_line(line, "/v1/embeddings", &mut seen, &limits()).unwrap();
        let EngineCall::Embeddings(r) = parsed.request else {
            panic!("an embeddings call")
        };
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.encoding, embeddings::Encoding::Base64);
        assert_eq!(parsed.model.as_deref(), Some("m"));
        let bad = r#"{"custom_id":"f","method":"POST","url":"/v1/embeddings","body":{"input":[]}}"#;
        let e = parse_request_line(bad, "/v1/embeddings", &mut seen, &limits()).unwrap_err();
        assert_eq!(e.code, "invalid_body");
        assert!(e.message.contains("empty array"), "{}", e.message);
    }

    #[test]
    fn logprobs_fields_follow_each_endpoint() {
        let chat = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parse_chat_body(body, &limits()).map(|(call, _)| match call {
                EngineCall::Chat(c) => c.params.logprobs,
                _ => unreachable!("a chat body"),
            })
        };
        assert_eq!(chat(json!({})).unwrap(), None);
        assert_eq!(chat(json!({"logprobs": true})).unwrap(), Some(0));
        assert_eq!(
            chat(json!({"logprobs": true, "top_logprobs": 20})).unwrap(),
            Some(20)
        );
        assert_eq!(chat(json!({"logprobs": false})).unwrap(), None);
        assert!(chat(json!({"logprobs": true, "top_logprobs": 21})).is_err());
        assert!(chat(json!({"top_logprobs": 2})).is_err());
        assert!(chat(json!({"logprobs": 3})).is_err());
        let completion = |lp: Value| {
            parse_completion_body(json!({"prompt": "a", "logprobs": lp}), &limits()).map(
                |(c, _)| match c {
                    EngineCall::Completion(c) => c.params.logprobs,
                    _ => unreachable!("a completion body"),
                },
            )
        };
        assert_eq!(completion(json!(3)).unwrap(), Some(3));
        assert_eq!(completion(Value::Null).unwrap(), None);
        assert!(completion(json!(6)).is_err());
        assert!(completion(json!(true)).is_err());
    }

    /// The response shapes OpenAI clients parse: `content[]` for chat, parallel arrays for
    /// completions, with text offsets in characters.
    #[test]
    fn logprobs_are_written_in_openai_shapes() {
        let top = |id: u32, text: &str, logprob: f32| TopLogprob {
            id,
            bytes: text.as_bytes().to_vec(),
            logprob,
        };
        let c = Completion {
            text: "é ok".into(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 3,
            cached_tokens: 2,
            completion_tokens: 2,
            logprobs: Some(vec![
                batchlab_engine::TokenLogprob {
                    token: top(7, "é", -0.5),
                    text_offset: 0,
                    top: vec![top(7, "é", -0.5), top(9, "e", -1.5)],
                },
                batchlab_engine::TokenLogprob {
                    token: top(8, " ok", -0.25),
                    text_offset: 2,
                    top: vec![],
                },
            ]),
        };
        let chat = chat_completion_object("id", "m", 0, &c);
        assert_eq!(
            chat["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
        let content = &chat["choices"][0]["logprobs"]["content"];
        assert_eq!(content[0]["token"], "é");
        assert_eq!(content[0]["bytes"], json!([195, 169]));
        assert_eq!(content[0]["logprob"], json!(-0.5));
        assert_eq!(content[0]["top_logprobs"][1]["token"], "e");
        assert_eq!(content[1]["top_logprobs"], json!([]));
        let text = text_completion_object("id", "m", 0, &c);
        let lp = &text["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"], json!(["é", " ok"]));
        assert_eq!(lp["token_logprobs"], json!([-0.5, -0.25]));
        assert_eq!(lp["top_logprobs"][0]["e"], json!(-1.5));
        assert_eq!(lp["text_offset"], json!([0, 1]));
        let plain = Completion {
            logprobs: None,
            ..c
        };
        assert_eq!(
            chat_completion_object("id", "m", 0, &plain)["choices"][0]["logprobs"],
            Value::Null
        );
    }

    #[test]
    fn output_constraints_come_from_response_format_or_vllm_fields() {
        let constraint = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parse_chat_body(body, &limits()).map(|(c, _)| match c {
                EngineCall::Chat(c) => c.params.constraint,
                _ => unreachable!("a chat body"),
            })
        };
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(constraint(json!({})).unwrap(), None);
        assert_eq!(
            constraint(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        assert_eq!(
            constraint(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(Constraint::JsonObject)
        );
        let rf = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}});
        assert_eq!(
            constraint(rf).unwrap(),
            Some(Constraint::JsonSchema(schema.clone()))
        );
        assert_eq!(
            constraint(json!({"guided_json": schema.to_string()})).unwrap(),
            Some(Constraint::JsonSchema(schema.clone()))
        );
        assert_eq!(
            constraint(json!({"guided_regex": "[0-9]+"})).unwrap(),
            Some(Constraint::Regex("[0-9]+".into()))
        );
        assert_eq!(
            constraint(json!({"guided_choice": ["a", "b"]})).unwrap(),
            Some(Constraint::Choice(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            constraint(json!({"structured_outputs": {"choice": ["a"]}})).unwrap(),
            Some(Constraint::Choice(vec!["a".into()]))
        );
        assert_eq!(
            constraint(json!({"structured_outputs": {"grammar": "start: \"x\""}})).unwrap(),
            Some(Constraint::Lark("start: \"x\"".into()))
        );
        for bad in [
            json!({"response_format": {"type": "xml"}}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}),
            json!({"guided_json": "{not json"}),
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            json!({"structured_outputs": {"xml": "a"}}),
        ] {
            assert!(constraint(bad.clone()).is_err(), "{bad}");
        }
        let (call, _) = parse_completion_body(
            json!({"prompt": "a", "guided_choice": ["yes", "no"]}),
            &limits(),
        )
        .unwrap();
        let EngineCall::Completion(c) = call else {
            unreachable!()
        };
        assert_eq!(
            c.params.constraint,
            Some(Constraint::Choice(vec!["yes".into(), "no".into()]))
        );
    }

    /// `max_tokens` and `max_completion_tokens` are bounded by the server's limit, named in the
    /// error; the default never exceeds it.
    #[test]
    fn max_tokens_above_the_limit_is_refused_naming_it() {
        let body = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body
        };
        let err =
            parse_chat_body(body(json!({"max_tokens": 1_000_000_000})), &limits()).unwrap_err();
        assert_eq!(
            err,
            "max_tokens 1000000000 exceeds this server's limit of 4096"
        );
        let err =
            parse_chat_body(body(json!({"max_completion_tokens": 4097})), &limits()).unwrap_err();
        assert_eq!(
            err,
            "max_completion_tokens 4097 exceeds this server's limit of 4096"
        );
        let err = parse_completion_body(json!({"prompt": "a", "max_tokens": 5000}), &limits())
            .unwrap_err();
        assert!(err.contains("limit of 4096"), "{err}");
        let (call, _) = parse_chat_body(body(json!({"max_tokens": 4096})), &limits()).unwrap();
        let EngineCall::Chat(c) = call else {
            unreachable!()
        };
        assert_eq!(c.params.max_tokens, Some(4096));
        let small = BodyLimits {
            default_max_tokens: 256,
            max_tokens_limit: 100,
            max_messages: 8,
        };
        let (call, _) = parse_chat_body(body(json!({})), &small).unwrap();
        let EngineCall::Chat(c) = call else {
            unreachable!()
        };
        assert_eq!(
            c.params.max_tokens,
            Some(100),
            "the default is capped by the limit"
        );
        // In a batch line it is that line's invalid_body error.
        let line = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body(json!({"max_tokens": 1_000_000_000}))});
        let err = parse(&line.to_string(), &mut HashSet::new()).unwrap_err();
        assert_eq!(
            (err.code, err.custom_id.as_deref()),
            ("invalid_body", Some("a"))
        );
        assert!(err.message.contains("limit of 4096"), "{}", err.message);
    }

    #[test]
    fn too_many_messages_are_refused() {
        let messages =
            |n: usize| json!({"messages": vec![json!({"role": "user", "content": "x"}); n]});
        assert!(parse_chat_body(messages(8), &limits()).is_ok());
        let err = parse_chat_body(messages(9), &limits()).unwrap_err();
        assert_eq!(
            err,
            "body.messages holds 9 messages; this server accepts 8 at most"
        );
    }

    #[test]
    fn a_custom_id_holding_nul_is_refused() {
        let line = r#"{"custom_id":"a\u0000b","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"x"}]}}"#;
        let err = parse(line, &mut HashSet::new()).unwrap_err();
        assert_eq!(err.code, "invalid_custom_id");
        assert_eq!(
            err.custom_id.as_deref(),
            Some("a\0b"),
            "the id is kept for the (JSON-escaped) error line"
        );
    }

    #[test]
    fn content_parts_are_joined() {
        let body = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
        let (call, _) = parse_chat_body(body, &limits()).unwrap();
        let EngineCall::Chat(c) = call else {
            unreachable!()
        };
        assert_eq!(c.messages[0].content, "ab");
        let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
        assert!(parse_chat_body(image, &limits()).is_err());
    }
}
