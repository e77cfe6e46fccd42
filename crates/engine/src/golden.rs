//! The engine against llama.cpp on the same GGUF files: fixtures that
//! `scripts/golden-fixtures.sh` computed with llama-cpp-python (`tests/fixtures/golden-*.json`)
//! hold the top-k logits at every position of a few prompts (one past 512 tokens), a greedy
//! continuation, and the token ids of a corpus of tokenizer edge cases.
//!
//! The files are the two shipped models (SmolLM2, Gemma 3) and, for the other architectures,
//! tiny random-weight models with their family's real tokenizer that `scripts/tiny-models.sh`
//! writes (`tiny-*.gguf`: Qwen2, Qwen3, Llama 3, Phi-3), so that no download of a real
//! model is needed to prove each architecture's layers and tokenizer.
//!
//! The model loads as the services load it (requantization on, `engine.requantize`'s default:
//! on a CPU without the packed kernel SmolLM2's Q4_1 becomes Q8_0, with it Gemma 3's Q6_K
//! does), while llama.cpp ran the files as they are; the fixtures were computed with an f32 KV
//! cache, the engine keeps f16 (llama.cpp's default). The two sum in different orders, and each
//! layer rounds its activations to 8 bits before the quantized matmuls, which turns last-bit
//! differences into logit differences of a few tenths: the tests bound the mean, the 99th
//! percentile and the largest difference over llama.cpp's top-k tokens at every position, per
//! model, and require the same best token wherever it leads clearly (a wrong architecture
//! misses all of them by far).
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
/// llama.cpp's, over the top-k tokens of every position, per model. Both round the activations
/// to 8 bits before the packed matmuls, but where the engine has no packed kernel (a CPU
/// without AVX2) it computes prompt positions with f32 activations over requantized
/// weights (see `model::weights::Linear`), which moves rare single logits further from
/// llama.cpp's while the bulk stays close: the mean and p99 are what catch a wrong layer.
/// Measured with the packed kernel (AVX-512 VNNI and AMX; AVX2 gives the same bits), over ~680
/// positions each: SmolLM2 (Q4_1 as it is, f16 KV) mean 0.14, p99 0.52, max 0.82; Gemma 3 (Q6_K requantized to Q8_0)
/// mean 0.18, p99 0.70, max 1.24; without the packed kernel Gemma 3 measured up to max 4.6.
const SMOLLM2: Tolerance = Tolerance {
    mean: 0.3,
    p99: 1.2,
    max: 6.0,
    greedy_same_tenths: 9,
};

/// Gemma 3 270M: as [`SMOLLM2`]; its greedy continuation meets near-ties more often (21-22
/// of 24 steps the same, every step with a clear lead the same).
const GEMMA3: Tolerance = Tolerance {
    greedy_same_tenths: 8,
    ..SMOLLM2
};

/// The tiny models (two layers, logits up to ~17): measured mean 0.05-0.065, p99 0.16-0.22,
/// max 0.26-0.34 over 670-763 positions each, and tiny-llama3 (its down projections Q4_K,
/// 512 wide) mean 0.086, p99 0.29, max 0.42 over 674 (AVX-512 VNNI and AMX); a wrong detail
/// of an architecture (a bias, a norm, the RoPE layout or its factors) moves logits by whole
/// units.
const TINY: Tolerance = Tolerance {
    mean: 0.15,
    p99: 0.4,
    max: 1.0,
    greedy_same_tenths: 8,
};

/// Bounds on |ours − llama.cpp| over llama.cpp's top-k logits of every position, and the
/// share of greedy steps whose next token must be llama.cpp's.
#[derive(Clone, Copy)]
struct Tolerance {
    mean: f32,
    p99: f32,
    max: f32,
    /// In tenths: random weights leave more near-ties between the two best tokens, where
    /// rounding noise decides, than a trained model.
    greedy_same_tenths: usize,
}

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
    /// A conversation through the GGUF's chat template, where it has one.
    #[serde(default)]
    chat: Option<Chat>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<crate::ChatMessage>,
    /// The template's text as llama-cpp-python's Jinja renders it.
    prompt: String,
    /// llama.cpp's ids for that text, control tokens parsed.
    ids: Vec<u32>,
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
    /// The model file and its metadata (the chat template lives there).
    path: PathBuf,
    content: gguf_file::Content,
}

/// The fixture and its model, requantized or not (see `model::weights`).
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
        path,
        content,
    })
}

/// The fixture and its model, loaded as the services load it.
fn load(fixture_file: &str) -> Option<Loaded> {
    // `engine.requantize` is on by default in the services' configuration.
    load_with(fixture_file, true)
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

fn logits_match_llama_cpp(fixture_file: &str, tolerance: Tolerance) {
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
        mean <= tolerance.mean as f64,
        "mean difference {mean} > {}",
        tolerance.mean
    );
    assert!(
        p99 <= tolerance.p99,
        "99th-percentile difference {p99} > {}",
        tolerance.p99
    );
    assert!(
        max <= tolerance.max,
        "largest difference {max} > {}",
        tolerance.max
    );
    assert_eq!(top1_same, clear, "a clearly best token differs");
}

/// llama.cpp's greedy continuation of the first prompt, fed back token by token: at every step
/// where our own best token leads clearly, it is llama.cpp's choice. (Free-running greedy text
/// may part ways at a near tie, where rounding noise decides; the length of the common start
/// is printed.)
fn greedy_matches_llama_cpp(fixture_file: &str, tolerance: Tolerance) {
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
        same * 10 >= n * tolerance.greedy_same_tenths,
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
    logits_match_llama_cpp("golden-smollm2.json", SMOLLM2);
}

#[test]
fn gemma3_logits_match_llama_cpp() {
    logits_match_llama_cpp("golden-gemma3.json", GEMMA3);
}

#[test]
fn smollm2_greedy_text_matches_llama_cpp() {
    greedy_matches_llama_cpp("golden-smollm2.json", SMOLLM2);
}

#[test]
fn gemma3_greedy_text_matches_llama_cpp() {
    greedy_matches_llama_cpp("golden-gemma3.json", GEMMA3);
}

/// The fixture's conversation through the GGUF's chat template: the same text as
/// llama-cpp-python's Jinja renders, and the same ids as llama.cpp gives that text with control
/// tokens parsed (Phi-3's markers swallow the whitespace after them; SentencePiece's space
/// prefix goes before each run of text).
fn chat_matches_llama_cpp(fixture_file: &str) {
    let Some(Loaded {
        fixture,
        tokenizer,
        path,
        content,
        ..
    }) = load(fixture_file)
    else {
        return;
    };
    let chat = fixture.chat.expect("the fixture has a chat");
    let template =
        crate::loading::chat_template(&path, &content, &tokenizer, crate::RequestLimits::default())
            .unwrap();
    assert_eq!(template.render(&chat.messages).unwrap(), chat.prompt);
    let ids = template.encode(&tokenizer, &chat.messages).unwrap();
    assert_eq!(
        ids, chat.ids,
        "{}: chat ids differ from llama.cpp's",
        fixture.model
    );
}

/// One architecture's golden tests on its tiny model: tokenizer, logits and greedy text.
macro_rules! tiny_model_matches_llama_cpp {
    ($name:ident, $fixture:literal) => {
        mod $name {
            #[test]
            fn tokenizer_matches_llama_cpp() {
                super::tokenizer_matches_llama_cpp($fixture);
            }

            #[test]
            fn logits_match_llama_cpp() {
                super::logits_match_llama_cpp($fixture, super::TINY);
            }

            #[test]
            fn chat_matches_llama_cpp() {
                super::chat_matches_llama_cpp($fixture);
            }

            #[test]
            fn greedy_text_matches_llama_cpp() {
                super::greedy_matches_llama_cpp($fixture, super::TINY);
            }
        }
    };
}

tiny_model_matches_llama_cpp!(qwen2, "golden-tiny-qwen2.json");
tiny_model_matches_llama_cpp!(qwen3, "golden-tiny-qwen3.json");
tiny_model_matches_llama_cpp!(llama3, "golden-tiny-llama3.json");
tiny_model_matches_llama_cpp!(phi3, "golden-tiny-phi3.json");

/// llama.cpp's own tokenizer test vectors (`models/ggml-vocab-*.gguf.inp` and `.out`, the
/// texts and the ids llama.cpp's tests expect, shipped with its vocabulary files and kept by
/// `scripts/tiny-models.sh`): our tokenizer built from the same vocabulary gives every id.
fn vocabulary_matches_llama_cpp_test_vectors(vocab: &str) {
    let Some(path) = crate::testing::model_file(&format!("vocab/ggml-vocab-{vocab}.gguf")) else {
        return;
    };
    let mut reader = BufReader::new(std::fs::File::open(&path).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let tokenizer = GgufTokenizer::from_gguf(&content).unwrap();
    let read = |ext: &str| std::fs::read_to_string(format!("{}{ext}", path.display())).unwrap();
    let (inp, out) = (read(".inp"), read(".out"));
    let texts: Vec<&str> = inp
        .strip_suffix("\n__ggml_vocab_test__\n")
        .unwrap()
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), expected.len(), "{vocab}: test vectors");
    assert!(
        texts.len() >= 40,
        "{vocab}: only {} test vectors",
        texts.len()
    );
    let wrong: Vec<String> = texts
        .iter()
        .zip(&expected)
        .filter_map(|(text, ids)| {
            let ours = tokenizer.encode_plain(text).unwrap();
            (&ours != ids).then(|| format!("{text:?}: ours {ours:?}, llama.cpp {ids:?}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{vocab}: {} of {} differ:\n{}",
        wrong.len(),
        texts.len(),
        wrong.join("\n")
    );
}

#[test]
fn qwen2_vocabulary_matches_llama_cpp_test_vectors() {
    vocabulary_matches_llama_cpp_test_vectors("qwen2");
}

#[test]
fn llama3_vocabulary_matches_llama_cpp_test_vectors() {
    vocabulary_matches_llama_cpp_test_vectors("llama-bpe");
}

#[test]
fn phi3_vocabulary_matches_llama_cpp_test_vectors() {
    vocabulary_matches_llama_cpp_test_vectors("phi-3");
}
