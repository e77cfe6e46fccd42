//! Property tests of the batch request-line parser: no input makes it panic, and a valid line
//! built from arbitrary ids and bodies parses back to exactly what was serialized.

use std::collections::HashSet;

use batchlab_inference::completions::{
    parse_chat_body, parse_request_line, BodyLimits, EngineCall, LineError, RequestLine,
};
use batchlab_inference::engine::ChatMessage;
use proptest::prelude::*;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn limits() -> BodyLimits {
    BodyLimits {
        default_max_tokens: 16,
        max_tokens_limit: 4096,
        max_messages: 64,
    }
}

fn parse(line: &str, endpoint: &str) -> Result<RequestLine, LineError> {
    parse_request_line(line, endpoint, &mut HashSet::new(), &limits())
}

/// Arbitrary JSON values, a few levels deep, with the keys the parser looks at mixed in.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("custom_id".to_string()),
        Just("method".to_string()),
        Just("url".to_string()),
        Just("body".to_string()),
        Just("messages".to_string()),
        Just("role".to_string()),
        Just("content".to_string()),
        Just("max_tokens".to_string()),
        Just("prompt".to_string()),
        Just("response_format".to_string()),
        Just("logprobs".to_string()),
        ".{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,16}".prop_map(Value::from),
        Just(Value::from("POST")),
        Just(Value::from(CHAT)),
        Just(Value::from("user")),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A chat message as a client would send it: a role and text, as a string or as text parts.
fn message() -> impl Strategy<Value = (Value, ChatMessage)> {
    let role = prop_oneof![
        Just("system"),
        Just("developer"),
        Just("user"),
        Just("assistant"),
        Just("tool")
    ];
    (role, any::<String>(), any::<bool>()).prop_map(|(role, text, as_parts)| {
        let content = if as_parts {
            json!([{"type": "text", "text": text}])
        } else {
            json!(text)
        };
        let expected = ChatMessage {
            role: if role == "developer" { "system" } else { role }.to_string(),
            content: text,
        };
        (json!({"role": role, "content": content}), expected)
    })
}

/// A custom_id the parser must accept: non-empty, without U+0000.
fn custom_id() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("non-empty, no NUL", |s| !s.is_empty() && !s.contains('\0'))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        for endpoint in [CHAT, COMPLETIONS, "/v1/embeddings"] {
            let _ = parse(&text, endpoint);
        }
    }

    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        let _ = parse(&text, CHAT);
        let _ = parse(&text, COMPLETIONS);
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        let text = value.to_string();
        let _ = parse(&text, CHAT);
        let _ = parse(&text, COMPLETIONS);
        // The same value as the body of an otherwise valid line.
        for endpoint in [CHAT, COMPLETIONS] {
            let line = json!({"custom_id": "x", "method": "POST", "url": endpoint, "body": value.clone()});
            let _ = parse(&line.to_string(), endpoint);
        }
        let _ = parse_chat_body(value, &limits());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// What was serialized comes back: custom_id, messages (developer read as system), model,
    /// max_tokens, temperature, seed, stop.
    #[test]
    fn valid_chat_lines_round_trip(
        id in custom_id(),
        messages in prop::collection::vec(message(), 1..6),
        model in proptest::option::of(".{0,24}"),
        max_tokens in proptest::option::of(1u64..=4096),
        temperature in (0u32..=8).prop_map(|t| f64::from(t) / 4.0),
        seed in proptest::option::of(any::<i64>()),
        stop in prop::collection::vec(".{1,8}", 0..=4),
    ) {
        let (sent, expected): (Vec<Value>, Vec<ChatMessage>) = messages.into_iter().unzip();
        let mut body = json!({"messages": sent, "temperature": temperature, "stop": stop});
        if let Some(m) = &model { body["model"] = json!(m); }
        if let Some(n) = max_tokens { body["max_tokens"] = json!(n); }
        if let Some(s) = seed { body["seed"] = json!(s); }
        let line = json!({"custom_id": id, "method": "POST", "url": CHAT, "body": body}).to_string();
        let parsed = parse(&line, CHAT).map_err(|e| TestCaseError::fail(format!("{e:?} for {line}")))?;
        prop_assert_eq!(&parsed.custom_id, &id);
        prop_assert_eq!(&parsed.model, &model);
        let EngineCall::Chat(chat) = parsed.request else { return Err(TestCaseError::fail("a chat call")) };
        prop_assert_eq!(chat.messages, expected);
        prop_assert_eq!(chat.params.max_tokens, Some(max_tokens.map_or(16, |n| n as usize)));
        prop_assert_eq!(chat.params.temperature, temperature);
        prop_assert_eq!(chat.params.seed, seed.map(|s| s as u64));
        prop_assert_eq!(chat.params.stop, stop);

        // The same line against the other endpoint, or with another method, is refused.
        prop_assert_eq!(parse(&line, COMPLETIONS).unwrap_err().code, "mismatched_url");
        let get = json!({"custom_id": id, "method": "GET", "url": CHAT, "body": {}}).to_string();
        prop_assert_eq!(parse(&get, CHAT).unwrap_err().code, "invalid_method");
    }

    #[test]
    fn valid_completion_lines_round_trip(id in custom_id(), prompt in any::<String>(), one_of_array in any::<bool>()) {
        let sent = if one_of_array { json!([prompt]) } else { json!(prompt) };
        let line = json!({"custom_id": id, "method": "POST", "url": COMPLETIONS, "body": {"prompt": sent}}).to_string();
        let parsed = parse(&line, COMPLETIONS).map_err(|e| TestCaseError::fail(format!("{e:?} for {line}")))?;
        prop_assert_eq!(&parsed.custom_id, &id);
        let EngineCall::Completion(c) = parsed.request else { return Err(TestCaseError::fail("a completion call")) };
        prop_assert_eq!(c.prompt, prompt);
    }

    /// An id seen once is a duplicate the second time; an id holding NUL is never accepted.
    #[test]
    fn custom_ids_are_unique_and_never_hold_nul(id in custom_id(), at in 0usize..8) {
        let line = |id: &str| json!({"custom_id": id, "method": "POST", "url": COMPLETIONS, "body": {"prompt": "p"}}).to_string();
        let mut seen = HashSet::new();
        prop_assert!(parse_request_line(&line(&id), COMPLETIONS, &mut seen, &limits()).is_ok());
        let again = parse_request_line(&line(&id), COMPLETIONS, &mut seen, &limits()).unwrap_err();
        prop_assert_eq!(again.code, "duplicate_custom_id");
        let mut with_nul = id.clone();
        with_nul.insert(id.char_indices().nth(at).map_or(id.len(), |(i, _)| i), '\0');
        prop_assert_eq!(parse(&line(&with_nul), COMPLETIONS).unwrap_err().code, "invalid_custom_id");
    }
}
