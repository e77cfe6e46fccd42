//! Load generator for batchlab-api's Label Studio webhook target, used by
//! `scripts/bench-webhooks.sh`.
//!
//! ```text
//! webhook_load --url http://127.0.0.1:PORT [--senders 8] [--events 20000] [--warmup 300]
//!              [--mode ingest|health|accuracy] [--project ID] [--tasks 10000]
//!              [--secret-header X-Batchlab-Secret --secret S] [--wait-processed]
//! webhook_load --url ... --mode burst [--events 120000] [--rate 2000]
//! ```
//!
//! * `health`: `GET /health` from every sender, the baseline of the server's HTTP path.
//! * `ingest`: `POST /v1/webhooks/label-studio` with distinct ANNOTATION_CREATED bodies shaped
//!   like Label Studio 1.23's (the full project payload included, about 6 KB each); annotation
//!   id, task id (spread over `--tasks` tasks), timestamps and answers vary per event, so no
//!   body is a duplicate. With `--wait-processed` it then waits until the background processor
//!   has applied them all and reports how long that took.
//! * `accuracy`: ingests `--tasks` ground-truth annotations (one per task), waits until the
//!   project shows them all valid (the processing lag), then times
//!   `POST /v1/label-studio/accuracy/{project}` with one prediction per task, best of three.
//! * `burst`: ingest's deliveries at a steady `--rate` per second (each body made as it is
//!   sent), while the processing lag is sampled every 250 ms: how long ago the oldest stored
//!   event not applied yet was answered (applied events are counted from the API's
//!   `batchlab_webhook_events_processed_total`; events are applied in the order they are
//!   stored). Reports the largest and median lag during the burst and how long after it the
//!   processor caught up.
//!
//! Latency is measured per request, from sending to the response body read in full; the rate
//! is requests over the wall time of the measured requests. Warm-up requests are not counted.
//! Prints one JSON object on stdout and a readable summary on stderr.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

/// The Label Studio 1.23 delivery the bodies are modelled on (captured from a real instance).
const FIXTURE: &str =
    include_str!("../../../tests/fixtures/label-studio-1.23/22-webhook-ANNOTATION_CREATED.json");

const RECOMMENDATION: [&str; 5] = ["strong_yes", "yes", "maybe", "no", "strong_no"];
const RATING: [&str; 5] = ["exceptional", "strong", "good", "average", "weak"];
/// Every tenth answer of a field is predicted wrong in accuracy mode.
const EXPECTED_ACCURACY: f64 = 0.9;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ingest,
    Health,
    Accuracy,
    Burst,
}

#[derive(Clone, Debug, Parser)]
#[command(about = "Load generator for batchlab-api's Label Studio webhook target")]
struct Args {
    /// Base URL of batchlab-api.
    #[arg(long)]
    url: String,
    /// Concurrent senders (each sends its next request once the previous one is answered).
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// Measured requests (ingest, health). Accuracy mode sends one event per task instead.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Requests sent first and not counted.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    #[arg(long, value_enum, default_value_t = Mode::Ingest)]
    mode: Mode,
    /// Label Studio project id of the events [default: 1 for ingest, 2 for accuracy].
    #[arg(long)]
    project: Option<i64>,
    /// Distinct tasks the events are spread over (accuracy: one ground truth per task).
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Header carrying the webhook secret.
    #[arg(long, default_value = "X-Batchlab-Secret")]
    secret_header: String,
    /// The webhook secret, when the API requires one.
    #[arg(long)]
    secret: Option<String>,
    /// Ingest: afterwards wait until every event is applied and report how long it took.
    #[arg(long)]
    wait_processed: bool,
    /// Longest wait for the processor, in seconds.
    #[arg(long, default_value_t = 600)]
    wait_timeout: u64,
    /// batchlab-api's process id, to report the CPU it used during the measured requests.
    #[arg(long)]
    api_pid: Option<u32>,
    /// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Burst: deliveries per second, all senders together.
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
}

/// CPU time so far, in clock ticks: of batchlab-api, of this process, and of the whole machine
/// (busy, all cores).
#[derive(Clone, Copy, Default)]
struct CpuSnap {
    api: Option<u64>,
    me: u64,
    machine_busy: u64,
}

/// utime + stime of a process, from `/proc/PID/stat`.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the first, utime the 12th.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Busy ticks of all cores together, from the first line of `/proc/stat` (idle and iowait excluded).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum()
}

impl CpuSnap {
    fn now(api_pid: Option<u32>) -> CpuSnap {
        CpuSnap {
            api: api_pid.and_then(|p| process_ticks(&p.to_string())),
            me: process_ticks("self").unwrap_or(0),
            machine_busy: machine_busy_ticks(),
        }
    }

    /// Cores busy on average between `self` and `later`, over `wall`.
    fn cores(&self, later: &CpuSnap, wall: Duration, hz: u64) -> Value {
        let cores =
            |a: u64, b: u64| (b.saturating_sub(a)) as f64 / hz.max(1) as f64 / wall.as_secs_f64();
        json!({
            "api": self.api.zip(later.api).map(|(a, b)| cores(a, b)),
            "load_generator": cores(self.me, later.me),
            "machine": cores(self.machine_busy, later.machine_busy),
        })
    }
}

/// One request's outcome.
#[derive(Clone, Copy)]
struct Sample {
    latency: Duration,
    status: u16,
    duplicate: bool,
}

/// What one run of requests measured.
struct Run {
    samples: Vec<Sample>,
    wall: Duration,
    transport_errors: usize,
    cpu: Value,
}

impl Run {
    fn summary(&self) -> Value {
        let mut lat: Vec<Duration> = self.samples.iter().map(|s| s.latency).collect();
        lat.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return f64::NAN;
            }
            // Nearest rank: the smallest latency at or above which p of the requests fall.
            let rank = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
            ms(lat[rank - 1])
        };
        let n = self.samples.len();
        json!({
            "requests": n,
            "seconds": self.wall.as_secs_f64(),
            "rate": n as f64 / self.wall.as_secs_f64(),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": lat.last().map(|d| ms(*d)).unwrap_or(f64::NAN),
            "non_2xx": self.samples.iter().filter(|s| !(200..300).contains(&s.status)).count(),
            "duplicates": self.samples.iter().filter(|s| s.duplicate).count(),
            "transport_errors": self.transport_errors,
            "cpu_cores": self.cpu,
        })
    }
}

/// What a sender sends: a GET, a prepared body, or a body made as it is sent.
#[derive(Clone)]
enum Request {
    Health,
    Webhook(Arc<Vec<bytes::Bytes>>),
    Made(Arc<dyn Fn(usize) -> bytes::Bytes + Send + Sync>),
}

/// How a run paces its requests and keeps their answers' times.
#[derive(Clone, Default)]
struct Pacing {
    /// Request `i` is sent no earlier than `i / rate` seconds into the run.
    rate: Option<f64>,
    /// When each answer arrived, in order.
    answered: Option<Arc<std::sync::Mutex<Vec<Instant>>>>,
}

/// Runs `count` requests (`offset..offset + count` of the prepared bodies) from `senders`
/// concurrent senders and times each.
async fn drive(
    client: &reqwest::Client,
    args: &Args,
    request: &Request,
    offset: usize,
    count: usize,
) -> Run {
    drive_paced(client, args, request, offset, count, Pacing::default()).await
}

/// [`drive`], paced as `pacing` says.
async fn drive_paced(
    client: &reqwest::Client,
    args: &Args,
    request: &Request,
    offset: usize,
    count: usize,
    pacing: Pacing,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = CpuSnap::now(args.api_pid);
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..args.senders.max(1) {
        let (client, request, next) = (client.clone(), request.clone(), next.clone());
        let base = args.url.trim_end_matches('/').to_string();
        let secret = args.secret.clone().map(|s| (args.secret_header.clone(), s));
        let pacing = pacing.clone();
        senders.spawn(async move {
            let (mut samples, mut errors) = (Vec::new(), 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                if let Some(rate) = pacing.rate {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let body = match &request {
                    Request::Health => None,
                    Request::Webhook(bodies) => Some(bodies[offset + i].clone()),
                    Request::Made(make) => Some(make(offset + i)),
                };
                let builder = match body {
                    None => client.get(format!("{base}/health")),
                    Some(body) => {
                        let mut b = client
                            .post(format!("{base}/v1/webhooks/label-studio"))
                            .header("Content-Type", "application/json")
                            .body(body);
                        if let Some((name, value)) = &secret {
                            b = b.header(name.as_str(), value.as_str());
                        }
                        b
                    }
                };
                let sent = Instant::now();
                match builder.send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let body = resp.bytes().await;
                        let latency = sent.elapsed();
                        let duplicate = !matches!(&request, Request::Health)
                            && body
                                .as_ref()
                                .is_ok_and(|b| b.windows(11).any(|w| w == b"\"duplicate\""));
                        if body.is_err() {
                            errors += 1;
                        } else if let Some(answered) = &pacing.answered {
                            answered
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Instant::now());
                        }
                        samples.push(Sample {
                            latency,
                            status,
                            duplicate,
                        });
                    }
                    Err(_) => errors += 1,
                }
            }
            (samples, errors)
        });
    }
    let mut run = Run {
        samples: Vec::with_capacity(count),
        wall: Duration::ZERO,
        transport_errors: 0,
        cpu: Value::Null,
    };
    while let Some(done) = senders.join_next().await {
        let (samples, errors) = done.expect("a sender panicked");
        run.samples.extend(samples);
        run.transport_errors += errors;
    }
    run.wall = started.elapsed();
    run.cpu = cpu_before.cores(&CpuSnap::now(args.api_pid), run.wall, args.clk_tck);
    run
}

/// `2026-11-27THH:MM:SS.ffffffZ`, `us` microseconds after that day's midnight (wrapping daily).
fn timestamp(us: u64) -> String {
    let us = us % 86_400_000_000;
    let (secs, frac) = (us / 1_000_000, us % 1_000_000);
    format!(
        "2026-11-27T{:02}:{:02}:{:02}.{frac:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Answers of the three Choices fields for event or task `i`.
fn answers(i: usize) -> [&'static str; 3] {
    [RECOMMENDATION[i % 5], RATING[i / 5 % 5], RATING[i / 25 % 5]]
}

/// The captured delivery's body, with this event's ids, times and answers.
fn event_body(
    template: &Value,
    project: i64,
    annotation_id: i64,
    task_id: i64,
    seq: usize,
    ground_truth: bool,
    choice: [&str; 3],
) -> bytes::Bytes {
    let mut body = template.clone();
    // Events about 1 ms apart, starting at 08:00 so the created/updated order is plausible.
    let t = 8 * 3_600_000_000 + seq as u64 * 1_000;
    let a = &mut body["annotation"];
    a["id"] = json!(annotation_id);
    a["task"] = json!(task_id);
    a["project"] = json!(project);
    a["ground_truth"] = json!(ground_truth);
    a["created_at"] = json!(timestamp(t));
    a["updated_at"] = json!(timestamp(t + 29));
    a["lead_time"] = json!(2.0 + (seq % 97) as f64 / 10.0);
    a["unique_id"] = json!(format!("00000000-0000-4000-8000-{:012x}", annotation_id));
    for (region, value) in a["result"].as_array_mut().into_iter().flatten().zip(choice) {
        region["value"]["choices"] = json!([value]);
    }
    if let Some(region) = a["result"].as_array_mut().and_then(|r| r.get_mut(3)) {
        region["value"]["text"] = json!([format!("annotator reasoning {seq}")]);
    }
    let p = &mut body["project"];
    p["id"] = json!(project);
    p["title"] = json!(format!("Candidate Evaluation {project}"));
    let t_task = &mut body["task"];
    t_task["id"] = json!(task_id);
    t_task["inner_id"] = json!(task_id);
    t_task["project"] = json!(project);
    t_task["updated_at"] = json!(timestamp(t + 60));
    t_task["data"]["name"] = json!(format!("Candidate {task_id}"));
    serde_json::to_vec(&body)
        .expect("a JSON value serializes")
        .into()
}

/// Ingest's delivery `n` to `project`: annotation `n` (ids of project p start at (p - 1)
/// million, as Label Studio's are global), spread over `tasks` tasks so that every task is
/// visited before one repeats.
fn ingest_body(template: &Value, project: i64, tasks: usize, n: usize) -> bytes::Bytes {
    let base = (project - 1) * 1_000_000;
    let task = base + 1 + ((n * 7_919) % tasks) as i64;
    event_body(
        template,
        project,
        base + 1 + n as i64,
        task,
        n,
        false,
        answers(n),
    )
}

/// `counts` of a project, or `None` while batchlab has not heard of it.
async fn project_counts(client: &reqwest::Client, args: &Args, project: i64) -> Option<Value> {
    let url = format!(
        "{}/v1/label-studio/projects/{project}",
        args.url.trim_end_matches('/')
    );
    let resp = client.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<Value>().await.ok()?.get("counts").cloned()
}

/// Polls until the project shows `valid` valid annotations; answers the time waited and the
/// cores busy meanwhile. A project's status costs the database a few counts over all its
/// annotations, so polling it every few milliseconds would slow down the processor being
/// measured: the pause before the next poll is half the time the remaining annotations should
/// take at the rate seen so far, between 25 ms and 1 s, so the last polls (which decide the
/// reading) come 25 ms apart and the many before them do not.
async fn wait_valid(
    client: &reqwest::Client,
    args: &Args,
    project: i64,
    valid: i64,
) -> Result<(Duration, Value), String> {
    let cpu_before = CpuSnap::now(args.api_pid);
    let started = Instant::now();
    let mut last = Value::Null;
    let mut first: Option<(Instant, i64)> = None;
    while started.elapsed() < Duration::from_secs(args.wait_timeout) {
        let mut pause = Duration::from_millis(25);
        if let Some(counts) = project_counts(client, args, project).await {
            let now_valid = counts["valid"].as_i64().unwrap_or(0);
            if now_valid == valid {
                let waited = started.elapsed();
                return Ok((
                    waited,
                    cpu_before.cores(&CpuSnap::now(args.api_pid), waited, args.clk_tck),
                ));
            }
            let (t0, v0) = *first.get_or_insert((Instant::now(), now_valid));
            let rate = (now_valid - v0) as f64 / t0.elapsed().as_secs_f64().max(1e-3);
            if rate > 0.0 {
                let left = (valid - now_valid).max(0) as f64 / rate / 2.0;
                pause = Duration::from_secs_f64(left.clamp(0.025, 1.0));
            }
            last = counts;
        }
        tokio::time::sleep(pause).await;
    }
    Err(format!(
        "project {project} did not reach {valid} valid annotations in {} s; last counts {last}",
        args.wait_timeout
    ))
}

/// Events the API says it has applied, whatever their outcome
/// (`batchlab_webhook_events_processed_total` on `/metrics`).
async fn events_processed(client: &reqwest::Client, args: &Args) -> Option<u64> {
    let url = format!("{}/metrics", args.url.trim_end_matches('/'));
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("batchlab_webhook_events_processed_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

/// Samples the processing lag every 250 ms until `done` events are applied or `timeout`
/// passes after `finished` is set: (seconds into the run, lag in seconds) each. The lag is the
/// age of the oldest event answered and not applied yet (0 when all answered are applied);
/// the first `before` applied events were sent before the run (its warm-up).
async fn sample_lag(
    client: reqwest::Client,
    args: Arc<Args>,
    started: Instant,
    answered: Arc<std::sync::Mutex<Vec<Instant>>>,
    before: u64,
    done: u64,
    finished: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(f64, f64)> {
    let mut samples = Vec::new();
    let mut ended: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(processed) = events_processed(&client, &args).await else {
            continue;
        };
        let now = Instant::now();
        let lag = {
            let answered = answered.lock().unwrap_or_else(|e| e.into_inner());
            match usize::try_from(processed.saturating_sub(before)) {
                Ok(applied) if applied < answered.len() => {
                    now.duration_since(answered[applied]).as_secs_f64()
                }
                _ => 0.0,
            }
        };
        samples.push((now.duration_since(started).as_secs_f64(), lag));
        if processed >= done {
            return samples;
        }
        if finished.load(Ordering::Relaxed) {
            let t = *ended.get_or_insert(now);
            if t.elapsed() > Duration::from_secs(args.wait_timeout) {
                return samples;
            }
        }
    }
}

fn report(label: &str, s: &Value) {
    eprintln!(
        "{label}: {} requests in {:.2} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, non-2xx {}, duplicates {}, transport errors {}; cores busy: api {:.2}, load generator {:.2}, machine {:.2}",
        s["requests"], s["seconds"].as_f64().unwrap_or(0.0), s["rate"].as_f64().unwrap_or(0.0),
        s["p50_ms"].as_f64().unwrap_or(f64::NAN), s["p99_ms"].as_f64().unwrap_or(f64::NAN),
        s["max_ms"].as_f64().unwrap_or(f64::NAN), s["non_2xx"], s["duplicates"], s["transport_errors"],
        s["cpu_cores"]["api"].as_f64().unwrap_or(f64::NAN), s["cpu_cores"]["load_generator"].as_f64().unwrap_or(f64::NAN),
        s["cpu_cores"]["machine"].as_f64().unwrap_or(f64::NAN)
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.senders.max(1))
        .timeout(Duration::from_secs(120))
        .build()?;
    let template: Value = serde_json::from_str::<Value>(FIXTURE)?["body"].clone();
    let mut out =
        json!({"mode": format!("{:?}", args.mode).to_lowercase(), "senders": args.senders});
    match args.mode {
        Mode::Health => {
            drive(&client, &args, &Request::Health, 0, args.warmup).await;
            let run = drive(&client, &args, &Request::Health, 0, args.events)
                .await
                .summary();
            report("GET /health", &run);
            out["run"] = run;
        }
        Mode::Ingest => {
            let project = args.project.unwrap_or(1);
            let tasks = args.tasks.max(1);
            let total = args.events + args.warmup;
            // Warm-up bodies come first.
            let bodies: Vec<bytes::Bytes> = (0..total)
                .map(|n| ingest_body(&template, project, tasks, n))
                .collect();
            let avg = bodies.iter().map(|b| b.len()).sum::<usize>() / bodies.len().max(1);
            let request = Request::Webhook(Arc::new(bodies));
            drive(&client, &args, &request, 0, args.warmup).await;
            let run = drive(&client, &args, &request, args.warmup, args.events)
                .await
                .summary();
            report("POST /v1/webhooks/label-studio", &run);
            out["run"] = run;
            out["body_bytes_avg"] = json!(avg);
            out["warmup"] = json!(args.warmup);
            out["project"] = json!(project);
            if args.wait_processed {
                let (lag, cpu) = wait_valid(&client, &args, project, total as i64).await?;
                eprintln!("processor caught up {:.2} s after the last answer; cores busy meanwhile: api {:.2}, machine {:.2}", lag.as_secs_f64(), cpu["api"].as_f64().unwrap_or(f64::NAN), cpu["machine"].as_f64().unwrap_or(f64::NAN));
                out["processing_lag_s"] = json!(lag.as_secs_f64());
                out["processing_cpu_cores"] = cpu;
            }
        }
        Mode::Burst => {
            let project = args.project.unwrap_or(1);
            let tasks = args.tasks.max(1);
            let template = Arc::new(template.clone());
            let make = move |n: usize| ingest_body(&template, project, tasks, n);
            let request = Request::Made(Arc::new(make));
            let before = events_processed(&client, &args).await.unwrap_or(0);
            drive(&client, &args, &request, 0, args.warmup).await;
            let answered = Arc::new(std::sync::Mutex::new(Vec::with_capacity(args.events)));
            let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let started = Instant::now();
            let probe = tokio::spawn(sample_lag(
                client.clone(),
                Arc::new(args.clone()),
                started,
                answered.clone(),
                before + args.warmup as u64,
                before + (args.warmup + args.events) as u64,
                finished.clone(),
            ));
            let pacing = Pacing {
                rate: Some(args.rate.max(1.0)),
                answered: Some(answered),
            };
            let run = drive_paced(&client, &args, &request, args.warmup, args.events, pacing)
                .await
                .summary();
            finished.store(true, Ordering::Relaxed);
            let burst_s = started.elapsed().as_secs_f64();
            let samples = probe.await?;
            report("burst POST /v1/webhooks/label-studio", &run);
            let during: Vec<f64> = samples
                .iter()
                .filter(|(t, _)| *t <= burst_s)
                .map(|(_, lag)| *lag)
                .collect();
            let mut sorted = during.clone();
            sorted.sort_by(f64::total_cmp);
            let max = sorted.last().copied().unwrap_or(f64::NAN);
            let p50 = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
            let caught_up = samples.last().map(|(t, lag)| (*t - burst_s, *lag));
            eprintln!(
                "burst of {:.0} s at {:.0}/s: processing lag max {max:.2} s, p50 {p50:.2} s over {} samples; last sample {caught_up:?} (s after the burst, lag)",
                burst_s, args.rate, during.len()
            );
            out["run"] = run;
            out["burst_s"] = json!(burst_s);
            out["target_rate"] = json!(args.rate);
            out["lag_max_s"] = json!(max);
            out["lag_p50_s"] = json!(p50);
            out["lag_samples"] = json!(during.len());
            out["lag_series"] = json!(samples
                .iter()
                .map(|(t, lag)| [(t * 100.0).round() / 100.0, (lag * 100.0).round() / 100.0])
                .collect::<Vec<_>>());
            out["caught_up_after_s"] = json!(caught_up
                .filter(|(_, lag)| *lag == 0.0)
                .map(|(t, _)| t.max(0.0)));
        }
        Mode::Accuracy => {
            let project = args.project.unwrap_or(2);
            let base = (project - 1) * 1_000_000;
            let tasks = args.tasks.max(1);
            let bodies: Vec<bytes::Bytes> = (0..tasks)
                .map(|i| {
                    event_body(
                        &template,
                        project,
                        base + 1 + i as i64,
                        base + 1 + i as i64,
                        i,
                        true,
                        answers(i),
                    )
                })
                .collect();
            let run = drive(
                &client,
                &args,
                &Request::Webhook(Arc::new(bodies)),
                0,
                tasks,
            )
            .await
            .summary();
            report("ground truth ingest", &run);
            out["ingest"] = run;
            out["project"] = json!(project);
            let (lag, cpu) = wait_valid(&client, &args, project, tasks as i64).await?;
            eprintln!("processor caught up {:.2} s after the last answer; cores busy meanwhile: api {:.2}, machine {:.2}", lag.as_secs_f64(), cpu["api"].as_f64().unwrap_or(f64::NAN), cpu["machine"].as_f64().unwrap_or(f64::NAN));
            out["processing_lag_s"] = json!(lag.as_secs_f64());
            out["processing_cpu_cores"] = cpu;

            // Every tenth answer of each field wrong (a different field's tasks each time).
            let predictions: Vec<Value> = (0..tasks)
                .map(|i| {
                    let mut a = answers(i);
                    if i % 10 == 0 {
                        a[0] = RECOMMENDATION[(i + 1) % 5];
                    }
                    if i % 10 == 1 {
                        a[1] = RATING[(i / 5 + 1) % 5];
                    }
                    if i % 10 == 2 {
                        a[2] = RATING[(i / 25 + 1) % 5];
                    }
                    json!({"task_id": base + 1 + i as i64, "prediction": {
                        "recommendation": a[0], "trajectory_rating": a[1], "pedigree_rating": a[2]}})
                })
                .collect();
            let body =
                bytes::Bytes::from(serde_json::to_vec(&json!({"predictions": predictions}))?);
            let url = format!(
                "{}/v1/label-studio/accuracy/{project}",
                args.url.trim_end_matches('/')
            );
            let mut calls_ms = Vec::new();
            let mut answer = Value::Null;
            for _ in 0..3 {
                let sent = Instant::now();
                let resp = client
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = resp.status();
                let text = resp.bytes().await?;
                calls_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                if !status.is_success() {
                    return Err(format!(
                        "accuracy call answered {status}: {}",
                        String::from_utf8_lossy(&text)
                    )
                    .into());
                }
                answer = serde_json::from_slice(&text)?;
            }
            let best = calls_ms.iter().copied().fold(f64::INFINITY, f64::min);
            eprintln!(
                "accuracy over {tasks} predictions ({} KB request): best {best:.1} ms of {calls_ms:.1?}; overall_accuracy {} (expected {EXPECTED_ACCURACY})",
                body.len() / 1024,
                answer["overall_accuracy"]
            );
            out["accuracy_ms_best"] = json!(best);
            out["accuracy_ms"] = json!(calls_ms);
            out["request_bytes"] = json!(body.len());
            out["overall_accuracy"] = answer["overall_accuracy"].clone();
            out["expected_accuracy"] = json!(EXPECTED_ACCURACY);
            out["compared"] = answer["counts"].clone();
        }
    }
    println!("{out}");
    Ok(())
}
