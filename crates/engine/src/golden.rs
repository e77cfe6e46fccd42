//! The engine against llama.cpp on the same GGUF files: fixtures that
//! `scripts/golden-fixtures.sh` computed with llama-cpp-python (`tests/fixtures/golden-*.json`)
//! hold the top-k logits at every position of a few prompts (one past 512 tokens), a greedy
//! continuation, and the token ids of a corpus of tokenizer edge cases.
//!
//! The weights run in their own formats here (no requantization), as llama.cpp runs them; the
//! fixtures were computed with an f32 KV cache, the engine keeps f16 (llama.cpp's default). The
//! two sum in different orders, and each layer rounds its activations to 8 bits before the
//! quantized matmuls, which turns last-bit differences into logit differences of a few tenths:
//! the tests bound the mean and
//! the largest difference over llama.cpp's top-k tokens at every position, and require the same
//! best token wherever it leads clearly (a wrong architecture misses all three by far).
//!
//! Each test prints a message and returns when a model file is missing, unless
//! `BATCHLAB_REQUIRE_MODELS` is set (the test suite sets it), then it fails.

use std::io::BufReader;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use serde::Deserialize;

use crate::model::{self, Model, Segment, SeqCache, Want};
use crate::tokenizer::GgufTokenizer;

/// Mean, 99th-percentile and largest difference allowed between a logit of ours and
/// llama.cpp's, over the top-k tokens of every position. Both round the activations to 8 bits
/// before the packed matmuls, but where the engine has no packed kernel (Gemma 3's Q4_K) it
/// computes prompt positions with f32 activations (see `model::weights::Linear`), which moves
/// rare single logits further from llama.cpp's while the bulk stays close: the mean and p99
/// are what catch a wrong layer.
/// Measured: SmolLM2 (packed Q4_1, f16 KV) mean 0.15, p99 0.56, max 1.26; Gemma 3 mean 0.22,
/// p99 0.78, max 4.6, over ~850 positions each.
const MEAN_TOLERANCE: f32 = 0.3;
const P99_TOLERANCE: f32 = 1.2;
const MAX_TOLERANCE: f32 = 6.0;

/// A lead of llama.cpp's best token over its second that noise cannot overturn.
const CLEAR_LEAD: f32 = 1.0;

/// Prompt positions run per forward pass (the prompts are processed in chunks, as the
/// scheduler does, which also keeps Gemma's 262,144-wide logits small).
const CHUNK: usize = 64;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    sha256: String,
    add_bos: bool,
    prompts: Vec<Prompt>,
    greedy: Vec<u32>,
    tokenizer: Vec<Case>,
}

#[derive(Deserialize)]
struct Prompt {
    text: String,
    tokens: Vec<u32>,
    /// Per position: (token id, logit) of llama.cpp's top k, best first.
    top: Vec<Vec<(u32, f32)>>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

struct Loaded {
    fixture: Fixture,
    model: Model,
    tokenizer: GgufTokenizer,
}

/// The fixture and its model, in the GGUF's own formats (as llama.cpp runs it) unless
/// `requantize` (faster, for tests that compare the engine with itself).
fn load_with(fixture_file: &str, requantize: bool) -> Option<Loaded> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixture: Fixture = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tests/fixtures").join(fixture_file)).unwrap(),
    )
    .unwrap();
    let path = crate::testing::model_file(&fixture.model)?;
    let bytes = std::fs::read(&path).unwrap();
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    assert_eq!(
        sha,
        fixture.sha256,
        "{} is not the file the fixture was computed on",
        path.display()
    );
    let mut reader = BufReader::new(std::io::Cursor::new(bytes));
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let tokenizer = GgufTokenizer::from_gguf(&content).unwrap();
    let loaded = model::load(&content, &mut reader, &Device::Cpu, requantize, Some(2048)).unwrap();
    Some(Loaded {
        fixture,
        model: loaded.model,
        tokenizer,
    })
}

fn load(fixture_file: &str) -> Option<Loaded> {
    load_with(fixture_file, false)
}

fn tokenizer_matches_llama_cpp(fixture_file: &str) {
    let Some(Loaded {
        fixture, tokenizer, ..
    }) = load(fixture_file)
    else {
        return;
    };
    let mut wrong = Vec::new();
    for case in &fixture.tokenizer {
        let ours = tokenizer.encode_plain(&case.text).unwrap();
        if ours != case.ids {
            wrong.push(format!(
                "{:?}: ours {ours:?}, llama.cpp {:?}",
                case.text, case.ids
            ));
        }
    }
    for p in &fixture.prompts {
        let mut ours = tokenizer.encode_plain(&p.text).unwrap();
        if fixture.add_bos {
            ours.insert(0, tokenizer.bos_id.unwrap());
        }
        if ours != p.tokens {
            wrong.push(format!(
                "prompt {:?}...: ids differ",
                &p.text[..20.min(p.text.len())]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} differ:\n{}",
        wrong.len(),
        fixture.tokenizer.len(),
        wrong.join("\n")
    );
    // Decoding gives the text back (SentencePiece decodes a literal "▁" as a space, as llama.cpp does).
    for case in fixture
        .tokenizer
        .iter()
        .filter(|c| !c.text.contains('\u{2581}'))
    {
        assert_eq!(
            tokenizer.decode(&case.ids, false).unwrap(),
            case.text,
            "round trip"
        );
    }
}

fn logits_match_llama_cpp(fixture_file: &str) {
    let Some(Loaded { fixture, model, .. }) = load(fixture_file) else {
        return;
    };
    let (mut diffs, mut late) = (Vec::new(), Vec::new());
    let (mut top1_same, mut clear, mut positions) = (0usize, 0usize, 0usize);
    for p in &fixture.prompts {
        let mut cache = SeqCache::new(model.cache_shape(), p.tokens.len(), model.device()).unwrap();
        let mut at = 0;
        for chunk in p.tokens.chunks(CHUNK) {
            let mut seg = [Segment {
                cache: &mut cache,
                tokens: chunk,
                want: Want::All,
                prompt: true,
            }];
            let logits = model.forward(&mut seg).unwrap().pop().unwrap().unwrap();
            for row in logits.to_vec2::<f32>().unwrap() {
                let theirs = &p.top[at];
                diffs.extend(
                    theirs
                        .iter()
                        .map(|&(id, logit)| (row[id as usize] - logit).abs()),
                );
                if at >= 512 {
                    late.extend(
                        theirs
                            .iter()
                            .map(|&(id, logit)| (row[id as usize] - logit).abs() as f64),
                    );
                }
                // Where llama.cpp's best token leads clearly, ours must agree.
                if theirs[0].1 - theirs[1].1 > CLEAR_LEAD {
                    clear += 1;
                    let ours_top = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0 as u32;
                    top1_same += usize::from(ours_top == theirs[0].0);
                }
                positions += 1;
                at += 1;
            }
        }
    }
    diffs.sort_by(f32::total_cmp);
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    let p99 = diffs[diffs.len() * 99 / 100];
    let max = diffs[diffs.len() - 1];
    eprintln!(
        "{}: {positions} positions; top-{} logits |ours - llama.cpp| mean {mean:.4} (past position 512: {:.4}), \
         p99 {p99:.4}, max {max:.4}; same best token at {top1_same} of {clear} positions with a clear lead",
        fixture.model,
        fixture.prompts[0].top[0].len(),
        late.iter().sum::<f64>() / late.len().max(1) as f64,
    );
    assert!(
        mean <= MEAN_TOLERANCE as f64,
        "mean difference {mean} > {MEAN_TOLERANCE}"
    );
    assert!(
        p99 <= P99_TOLERANCE,
        "99th-percentile difference {p99} > {P99_TOLERANCE}"
    );
    assert!(
        max <= MAX_TOLERANCE,
        "largest difference {max} > {MAX_TOLERANCE}"
    );
    assert_eq!(top1_same, clear, "a clearly best token differs");
}

/// llama.cpp's greedy continuation of the first prompt, fed back token by token: at every step
/// where our own best token leads clearly, it is llama.cpp's choice. (Free-running greedy text
/// may part ways at a near tie, where rounding noise decides; the length of the common start
/// is printed.)
fn greedy_matches_llama_cpp(fixture_file: &str) {
    let Some(Loaded { fixture, model, .. }) = load(fixture_file) else {
        return;
    };
    let prompt = &fixture.prompts[0].tokens;
    let mut cache = SeqCache::new(
        model.cache_shape(),
        prompt.len() + fixture.greedy.len(),
        model.device(),
    )
    .unwrap();
    let mut next = prompt.clone();
    let (mut same, mut clear, mut agree, mut common, mut parted) = (0, 0, 0, 0, false);
    for &theirs in &fixture.greedy {
        let mut seg = [Segment {
            cache: &mut cache,
            tokens: &next,
            want: Want::Last,
            prompt: false,
        }];
        let logits: Vec<f32> = model
            .forward(&mut seg)
            .unwrap()
            .pop()
            .unwrap()
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.select_nth_unstable_by(1, |&a, &b| logits[b].total_cmp(&logits[a]));
        let (best, second) = if logits[order[0]] >= logits[order[1]] {
            (order[0], order[1])
        } else {
            (order[1], order[0])
        };
        same += usize::from(best as u32 == theirs);
        parted |= best as u32 != theirs;
        common += usize::from(!parted);
        if logits[best] - logits[second] > CLEAR_LEAD {
            clear += 1;
            agree += usize::from(best as u32 == theirs);
        }
        next = vec![theirs];
    }
    let n = fixture.greedy.len();
    eprintln!(
        "{}: same next token at {same} of {n} steps ({agree} of {clear} with a clear lead); free-running text \
         shares its first {common} tokens",
        fixture.model
    );
    assert_eq!(
        agree, clear,
        "{}: a clearly best next token differs from llama.cpp's",
        fixture.model
    );
    assert!(
        same * 10 >= n * 9,
        "{}: next tokens differ at {} of {n} steps",
        fixture.model,
        n - same
    );
}

/// Gemma 3's local layers keep a ring of positions: the long prompt gives the same logits, to the
/// bit, with rings of different sizes (wrapping at different points) as with every position kept.
#[test]
fn gemma3_sliding_window_rings_change_nothing() {
    let Some(Loaded { fixture, model, .. }) = load_with("golden-gemma3.json", true) else {
        return;
    };
    let tokens = &fixture
        .prompts
        .iter()
        .max_by_key(|p| p.tokens.len())
        .unwrap()
        .tokens;
    assert!(
        tokens.len() > 600,
        "the long prompt must pass the 512-token window"
    );
    let last_logits = |shape: model::kv_cache::CacheShape, chunk: usize| -> Vec<Vec<f32>> {
        let mut cache = SeqCache::new(shape, tokens.len(), model.device()).unwrap();
        let mut out = Vec::new();
        for part in tokens.chunks(chunk) {
            let mut seg = [Segment {
                cache: &mut cache,
                tokens: part,
                want: Want::Last,
                prompt: true,
            }];
            out.push(
                model
                    .forward(&mut seg)
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
        }
        out
    };
    let ring = model.cache_shape();
    assert!(ring.local.is_some());
    let full = model::kv_cache::CacheShape {
        local: None,
        ..ring
    };
    // Compare at the positions every chunking shares (multiples of 240).
    let every = |v: Vec<Vec<f32>>, chunk: usize| -> Vec<Vec<f32>> {
        v.into_iter()
            .enumerate()
            .filter(|(i, _)| ((i + 1) * chunk).is_multiple_of(240))
            .map(|(_, l)| l)
            .collect()
    };
    let want = every(last_logits(full, 240), 240);
    assert!(want.len() >= 3);
    let same = |got: Vec<Vec<f32>>, what: &str| {
        let worst = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst == 0.0, "{what}: logits differ by up to {worst}");
    };
    same(
        every(last_logits(full, 80), 80),
        "every position kept, 80-position writes",
    );
    same(
        every(last_logits(ring, 240), 240),
        "ring with 240-position writes",
    );
    same(
        every(last_logits(ring, 80), 80),
        "ring with 80-position writes",
    );
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    tokenizer_matches_llama_cpp("golden-smollm2.json");
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    tokenizer_matches_llama_cpp("golden-gemma3.json");
}

#[test]
fn smollm2_logits_match_llama_cpp() {
    logits_match_llama_cpp("golden-smollm2.json");
}

#[test]
fn gemma3_logits_match_llama_cpp() {
    logits_match_llama_cpp("golden-gemma3.json");
}

#[test]
fn smollm2_greedy_text_matches_llama_cpp() {
    greedy_matches_llama_cpp("golden-smollm2.json");
}

#[test]
fn gemma3_greedy_text_matches_llama_cpp() {
    greedy_matches_llama_cpp("golden-gemma3.json");
}
