//! The prediction path on the real default model (`models/SmolLM2-135M-Instruct.Q4_1.gguf`;
//! skipped, saying so, when it is missing, and failing then under `BATCHLAB_REQUIRE_MODELS`):
//! a task's generated answers start from the prompt the scoring of its closed questions left in
//! the prompt cache, and that reuse changes no answer.

use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_inference::engine::testing::model_file;
use batchlab_inference::engine::Engine;
use batchlab_inference::predict::task::{predict_task, PredictOptions, Priors, Teaching};
use serde_json::json;

const CONFIG: &str = r#"<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text" choice="single"><Choice value="positive"/><Choice value="negative"/><Choice value="neutral"/></Choices><TextArea name="summary" toName="text"/></View>"#;

const TEXT: &str = "The hotel was close to the station and the staff were friendly, but the room \
    was small, the air conditioning rattled all night and breakfast ended at nine, so we ate \
    in a cafe across the square on every morning of our four-day stay in the old town.";

/// An engine on the default model with `prefix_cache_mb` of prompt cache.
fn engine(prefix_cache_mb: usize) -> Option<Engine> {
    let path = model_file("SmolLM2-135M-Instruct.Q4_1.gguf")?;
    let mut config = batchlab_core::config::Config::default();
    config.engine.model_path = path;
    config.engine.prefix_cache_mb = prefix_cache_mb;
    Some(
        Engine::load(batchlab_inference::engine_config(&config.engine))
            .expect("the default model loads"),
    )
}

#[tokio::test]
async fn a_generated_answer_reuses_the_task_prompt_its_scoring_computed() {
    let (Some(cached), Some(uncached)) = (engine(64), engine(0)) else {
        return;
    };
    let config = LabelConfig::parse(CONFIG).unwrap();
    let data = json!({ "text": TEXT });
    let options = PredictOptions {
        text_max_tokens: 8,
        ..PredictOptions::default()
    };
    let predict = |engine: Engine| {
        let (config, data, options) = (&config, &data, &options);
        async move {
            let priors = Priors::default();
            let p = predict_task(
                &engine,
                config,
                data,
                &Teaching::default(),
                options,
                &priors,
            )
            .await
            .expect("the task is predicted");
            (p, engine.reused_prompt_tokens())
        }
    };
    let (with_cache, reused) = predict(cached.clone()).await;
    let (without_cache, none) = predict(uncached).await;
    assert_eq!(none, 0, "no prompt cache, nothing reused");
    // A fresh engine has nothing cached but what this task's scoring computed: the generation's
    // reuse covers at least the task's text, which its prompt shares with the scored question.
    let text_tokens = cached.tokenize(TEXT).unwrap().len() as u64;
    assert!(
        reused >= text_tokens,
        "{reused} prompt tokens reused, fewer than the {text_tokens} of the task text"
    );
    assert_eq!(
        with_cache, without_cache,
        "the prompt cache changes no answer"
    );
    assert_eq!(with_cache.result.len(), 2, "{with_cache:?}");
}
