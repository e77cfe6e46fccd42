//! OpenAI's embeddings in the engine's terms: a `/v1/embeddings` body (a batch line's or the ML
//! backend's) becomes an [`EmbeddingsRequest`], and the engine's vectors become OpenAI's `list`
//! of `embedding` objects, as floats or, as the official `openai` package asks by default, as
//! base64 of little-endian `f32`s.

use base64::Engine as _;
use batchlab_core::error::InvalidInput;
use batchlab_engine::{EmbedInput, Embedding, Engine, EngineError, MAX_EMBEDDING_INPUTS};
use serde_json::{json, Value};

/// How the vectors are written in the answer (`encoding_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// JSON numbers (OpenAI's default).
    #[default]
    Float,
    /// Base64 of the little-endian `f32` bytes (what the `openai` package asks for).
    Base64,
}

/// A validated `/v1/embeddings` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingsRequest {
    /// The texts or token arrays, in order.
    pub inputs: Vec<EmbedInput>,
    /// How to write the vectors.
    pub encoding: Encoding,
    /// The length the client asked for, if any (only the model's own is served).
    pub dimensions: Option<u64>,
    /// The model the client named (answered by the loaded model regardless).
    pub model: Option<String>,
}

/// Validates a `/v1/embeddings` body: `input` is a string, an array of strings, an array of
/// token ids or an array of such arrays (at most [`MAX_EMBEDDING_INPUTS`] inputs, none empty);
/// `encoding_format` is `float` or `base64`; `dimensions` a positive integer.
pub fn parse_embeddings_body(mut body: Value) -> Result<EmbeddingsRequest, InvalidInput> {
    let invalid = |m: String| Err(InvalidInput(m));
    let Some(obj) = body.as_object_mut() else {
        return invalid("body must be a JSON object".into());
    };
    let inputs = match obj.remove("input") {
        None | Some(Value::Null) => return invalid("body.input is required".into()),
        Some(input) => parse_input(input).map_err(InvalidInput)?,
    };
    let encoding = match obj.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(other) => {
            return invalid(format!(
                "body.encoding_format must be \"float\" or \"base64\", got {other}"
            ))
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().filter(|&d| d > 0) {
            Some(d) => Some(d),
            None => {
                return invalid(format!(
                    "body.dimensions must be a positive integer, got {v}"
                ))
            }
        },
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return invalid(format!("body.model must be a string, got {other}")),
    };
    Ok(EmbeddingsRequest {
        inputs,
        encoding,
        dimensions,
        model,
    })
}

fn parse_input(input: Value) -> Result<Vec<EmbedInput>, String> {
    let items = match input {
        Value::String(s) => return Ok(vec![text(s, None)?]),
        Value::Array(items) => items,
        other => {
            return Err(format!(
                "body.input must be a string or an array, got {}",
                kind(&other)
            ))
        }
    };
    if items.is_empty() {
        return Err("body.input must not be an empty array".into());
    }
    if items.len() > MAX_EMBEDDING_INPUTS {
        return Err(format!(
            "body.input holds {} inputs; at most {MAX_EMBEDDING_INPUTS} may be embedded at once",
            items.len()
        ));
    }
    if items.iter().all(Value::is_number) {
        // One input given as its token ids.
        return Ok(vec![EmbedInput::Tokens(token_ids(items, None)?)]);
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => text(s, Some(i)),
            Value::Array(ids) if !ids.is_empty() => {
                Ok(EmbedInput::Tokens(token_ids(ids, Some(i))?))
            }
            Value::Array(_) => Err(format!("body.input[{i}] is an empty array")),
            other => Err(format!(
                "body.input[{i}] must be a string or an array of token ids, got {}",
                kind(&other)
            )),
        })
        .collect()
}

fn text(s: String, at: Option<usize>) -> Result<EmbedInput, String> {
    if s.is_empty() {
        return Err(match at {
            Some(i) => format!("body.input[{i}] is an empty string"),
            None => "body.input is an empty string".into(),
        });
    }
    Ok(EmbedInput::Text(s))
}

fn token_ids(ids: Vec<Value>, at: Option<usize>) -> Result<Vec<u32>, String> {
    let place = at.map_or("body.input".to_string(), |i| format!("body.input[{i}]"));
    ids.iter()
        .enumerate()
        .map(|(j, v)| {
            v.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| format!("{place}[{j}] must be a token id (an integer ≥ 0), got {v}"))
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Runs `request` on `engine`: a `dimensions` other than the model's own is refused (this
/// model's vectors cannot be shortened meaningfully), then the inputs are embedded.
pub async fn embed(
    engine: &Engine,
    request: &EmbeddingsRequest,
) -> Result<Vec<Embedding>, EngineError> {
    let native = engine.embedding_dimensions();
    if let Some(d) = request.dimensions.filter(|&d| d != native as u64) {
        return Err(EngineError::InvalidRequest(format!(
            "this model's embeddings have {native} dimensions; dimensions={d} is not supported"
        )));
    }
    engine.embed(request.inputs.clone()).await
}

/// OpenAI's answer to an embeddings request: a `list` of `embedding` objects in input order,
/// with the tokens read as `usage`.
pub fn embeddings_object(model: &str, encoding: Encoding, embeddings: &[Embedding]) -> Value {
    let data: Vec<Value> = embeddings
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let vector = match encoding {
                Encoding::Float => json!(e.vector),
                Encoding::Base64 => {
                    let bytes: Vec<u8> = e.vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    let tokens = prompt_tokens(embeddings);
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

/// Tokens read over all the inputs.
pub fn prompt_tokens(embeddings: &[Embedding]) -> usize {
    embeddings.iter().map(|e| e.tokens).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<EmbeddingsRequest, String> {
        parse_embeddings_body(body).map_err(InvalidInput::into_message)
    }

    #[test]
    fn every_input_form_of_openai_is_read() {
        let text = |s: &str| EmbedInput::Text(s.into());
        assert_eq!(
            parse(json!({"input": "a b"})).unwrap().inputs,
            vec![text("a b")]
        );
        assert_eq!(
            parse(json!({"input": ["a", "b"]})).unwrap().inputs,
            vec![text("a"), text("b")]
        );
        assert_eq!(
            parse(json!({"input": [1, 2, 3]})).unwrap().inputs,
            vec![EmbedInput::Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            parse(json!({"input": [[1, 2], [3]]})).unwrap().inputs,
            vec![EmbedInput::Tokens(vec![1, 2]), EmbedInput::Tokens(vec![3])]
        );
        let r = parse(
            json!({"input": "x", "model": "m", "encoding_format": "base64", "dimensions": 576}),
        )
        .unwrap();
        assert_eq!(
            (r.encoding, r.dimensions, r.model.as_deref()),
            (Encoding::Base64, Some(576), Some("m"))
        );
        assert_eq!(
            parse(json!({"input": "x"})).unwrap().encoding,
            Encoding::Float
        );
    }

    #[test]
    fn malformed_bodies_are_refused_naming_the_field() {
        let cases = [
            (json!([]), "JSON object"),
            (json!({}), "body.input is required"),
            (json!({"input": 3}), "a number"),
            (json!({"input": ""}), "empty string"),
            (json!({"input": []}), "empty array"),
            (
                json!({"input": ["a", ""]}),
                "body.input[1] is an empty string",
            ),
            (json!({"input": ["a", 1]}), "body.input[1] must be a string"),
            (
                json!({"input": [[1], []]}),
                "body.input[1] is an empty array",
            ),
            (
                json!({"input": [1, -2]}),
                "body.input[1] must be a token id",
            ),
            (
                json!({"input": [[1, 1e300]]}),
                "body.input[0][1] must be a token id",
            ),
            (json!({"input": [5_000_000_000u64]}), "must be a token id"),
            (
                json!({"input": "x", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (json!({"input": "x", "dimensions": 0}), "dimensions"),
            (json!({"input": "x", "model": 7}), "body.model"),
        ];
        for (body, expected) in cases {
            let message = parse(body.clone()).expect_err(&body.to_string());
            assert!(message.contains(expected), "{body}: {message}");
        }
        let too_many = json!({"input": vec!["a"; MAX_EMBEDDING_INPUTS + 1]});
        assert!(parse(too_many).unwrap_err().contains("at most 2048"));
    }

    #[test]
    fn base64_holds_the_little_endian_floats() {
        let e = Embedding {
            vector: vec![1.0, -0.5],
            tokens: 3,
        };
        let floats = embeddings_object("m", Encoding::Float, std::slice::from_ref(&e));
        assert_eq!(floats["data"][0]["embedding"], json!([1.0, -0.5]));
        assert_eq!(
            floats["usage"],
            json!({"prompt_tokens": 3, "total_tokens": 3})
        );
        let b64 = embeddings_object("m", Encoding::Base64, &[e.clone(), e]);
        let text = b64["data"][1]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, vec![1.0, -0.5]);
        assert_eq!(b64["data"][1]["index"], 1);
        assert_eq!(b64["object"], "list");
    }
}
