//! A request's tracing span travels with it into the model thread: what the model thread logs
//! while it works for a request (its spans and events) sits under the span the caller was in
//! when it called the [`Engine`], so a request id on the caller's span reaches every line.
//!
//! Its own test binary: the recording subscriber is installed process-wide (the model thread is
//! another thread), which no other test should share. Against the real default model file
//! (`models/SmolLM2-135M-Instruct.Q4_1.gguf`); without it the test prints a message and
//! returns, unless `BATCHLAB_REQUIRE_MODELS` is set: then a missing file fails it.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use batchlab_engine::{ChatMessage, ChatRequest, ChoiceQuestion, Engine, EngineConfig};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Instrument, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// The model thread's name (`Engine::load` names it).
const MODEL_THREAD: &str = "batchlab-model";

/// A span's fields as text (`name=value ...`), kept in the span's extensions.
struct Fields(String);

/// Writes fields as `name=value ` (values in their `Debug` form: strings quoted).
struct FieldText<'a>(&'a mut String);

impl Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

/// Something emitted on the model thread: an event (its fields) or a new span (its name and
/// fields), with every span it sits in, innermost first, as `name{fields}`.
#[derive(Debug)]
struct Emitted {
    what: String,
    within: Vec<String>,
}

impl Emitted {
    /// Whether one of the spans it sits in has the field `request_id = id`.
    fn under_request(&self, id: &str) -> bool {
        let field = format!("request_id={id:?}");
        self.within.iter().any(|s| s.contains(&field))
    }
}

/// A layer recording what is emitted on the model thread, with the spans it is in.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Emitted>>>);

impl Recorder {
    fn on_model_thread() -> bool {
        std::thread::current().name() == Some(MODEL_THREAD)
    }

    fn push(&self, what: String, within: Vec<String>) {
        self.0.lock().unwrap().push(Emitted { what, within });
    }

    fn emitted(&self) -> Vec<Emitted> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// `name{fields}` of `span`.
fn describe<S: for<'a> LookupSpan<'a>>(
    span: &tracing_subscriber::registry::SpanRef<'_, S>,
) -> String {
    let ext = span.extensions();
    let fields = ext.get::<Fields>().map_or("", |f| f.0.as_str());
    format!("{}{{{}}}", span.name(), fields.trim_end())
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut text = String::new();
        attrs.record(&mut FieldText(&mut text));
        let Some(span) = ctx.span(id) else { return };
        span.extensions_mut().insert(Fields(text));
        if Self::on_model_thread() {
            let within = span.scope().skip(1).map(|s| describe(&s)).collect();
            self.push(format!("span {}", describe(&span)), within);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if !Self::on_model_thread() {
            return;
        }
        let mut text = String::new();
        event.record(&mut FieldText(&mut text));
        let within = ctx
            .event_scope(event)
            .map(|scope| scope.map(|s| describe(&s)).collect())
            .unwrap_or_default();
        self.push(format!("event {}", text.trim_end()), within);
    }
}

#[tokio::test]
async fn a_requests_span_is_carried_into_the_model_thread() {
    let Some(model_path) = batchlab_engine::testing::model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        return;
    };
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(recorder.clone()))
        .expect("the only subscriber of this test binary");
    let engine = Engine::load(EngineConfig {
        model_path,
        model_id: "SmolLM2-135M-Instruct".into(),
        max_queue: 4,
        max_batch: 4,
        prefix_cache_bytes: 0,
        threads: Some(2),
        max_context: None,
        requantize: true,
        device: "cpu".into(),
        limits: Default::default(),
    })
    .expect("load");
    let messages = vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "What is the capital of France?"),
    ];

    // A generation: prefill, steps, finish, all on the model thread for request "abc".
    let completion = engine
        .chat(ChatRequest {
            messages: messages.clone(),
            params: batchlab_engine::SamplingParams {
                max_tokens: Some(4),
                temperature: 0.0,
                ..Default::default()
            },
        })
        .instrument(tracing::info_span!("request", request_id = "abc"))
        .await
        .unwrap();
    assert!(completion.completion_tokens > 0);
    let emitted = recorder.emitted();
    assert!(
        emitted
            .iter()
            .any(|e| e.what.contains("generation done") && e.under_request("abc")),
        "the model thread's \"generation done\" is not under the caller's span: {emitted:#?}"
    );
    let sequence_events = emitted
        .iter()
        .filter(|e| {
            e.what.starts_with("event")
                && e.within.iter().any(|s| s.starts_with("engine.sequence{"))
        })
        .collect::<Vec<_>>();
    assert!(
        sequence_events.len() >= 3,
        "admission, prompt and finish are logged in the sequence's span: {emitted:#?}"
    );
    assert!(
        sequence_events.iter().all(|e| e.under_request("abc")),
        "{sequence_events:#?}"
    );

    // A scoring job: its passes and its answer, for request "def" (and nothing of "abc").
    let scores = engine
        .score_choices(vec![ChoiceQuestion {
            messages,
            candidates: vec!["Paris".into(), "London".into()],
        }])
        .instrument(tracing::info_span!("request", request_id = "def"))
        .await
        .unwrap();
    assert_eq!(scores.len(), 1);
    let emitted = recorder.emitted();
    assert!(
        emitted
            .iter()
            .any(|e| e.what.contains("scoring done") && e.under_request("def")),
        "the model thread's \"scoring done\" is not under the caller's span: {emitted:#?}"
    );
    assert!(
        emitted.iter().all(|e| !e.under_request("abc")),
        "{emitted:#?}"
    );
}
