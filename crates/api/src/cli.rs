//! Command line of `batchlab-api`: `serve` (the default, also with no subcommand),
//! `setup-label-studio`, `reconcile-label-studio`, `healthcheck` and `config`.

use std::path::PathBuf;

use batchlab_core::config::{Config, ConfigArgs};
use batchlab_core::labelstudio::setup::SetupOptions;
use clap::{Parser, Subcommand};

/// The OpenAI-compatible Files and Batches API of batchlab (port 4080 by default).
#[derive(Parser)]
#[command(name = "batchlab-api", version, about)]
pub struct Args {
    /// A TOML file layered over config/default.toml (environment variables
    /// BATCHLAB_<SECTION>__<KEY> override both).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// What to do; `serve` when none is given.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Args {
    /// The configuration options shared with the other binaries.
    pub fn config_args(&self) -> ConfigArgs {
        ConfigArgs {
            config: self.config.clone(),
        }
    }
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Create or reuse a Label Studio project, connect batchlab-ml-backend to it and register
    /// batchlab-api's webhook with the shared-secret header; prints what it did as JSON.
    /// Label Studio's URL and key come from the configuration (LABEL_STUDIO_URL,
    /// LABEL_STUDIO_API_KEY).
    SetupLabelStudio(SetupArgs),
    /// Compare a project's tasks, annotations and ground truth with Label Studio's REST API and
    /// repair what webhooks lost while batchlab was down: the events Label Studio would have sent
    /// are synthesized, stored and applied like real deliveries (this command applies them
    /// itself; a running batchlab-api is no obstacle). Prints a JSON report; exits 0 when the
    /// two sides agree afterwards, 3 when they still differ, 1 on an error.
    ReconcileLabelStudio(ReconcileArgs),
    /// Ask the running API's `/health` on its configured address; exit 0 when it answers 200
    /// (a container's health check: the image has no curl).
    Healthcheck,
    /// Print every configuration key with its default, its environment variable and what it
    /// does (a Markdown table; the README's configuration reference is this output).
    Config {
        /// Print a JSON array of `{key, env, default, doc}` instead.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `reconcile-label-studio`.
#[derive(clap::Args)]
pub struct ReconcileArgs {
    /// Label Studio's project id.
    #[arg(long)]
    pub project: i64,
    /// Compare and report only: store and apply nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds to spend applying the stored events before verifying anyway.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub apply_timeout: u64,
    /// Tasks read per page, from Label Studio and from the database.
    #[arg(long, default_value_t = batchlab_core::curation::reconcile::DEFAULT_PAGE_SIZE as u64,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub page_size: u64,
}

impl ReconcileArgs {
    /// The reconciliation to run.
    pub fn options(&self) -> batchlab_core::curation::reconcile::ReconcileOptions {
        batchlab_core::curation::reconcile::ReconcileOptions {
            dry_run: self.dry_run,
            apply_timeout: std::time::Duration::from_secs(self.apply_timeout),
            page_size: self.page_size as usize,
        }
    }
}

/// Options of `setup-label-studio`.
#[derive(clap::Args)]
pub struct SetupArgs {
    /// Project title; a project with exactly this title is reused.
    #[arg(long, default_value = "Candidate Evaluation")]
    pub title: String,
    /// Labeling config (XML file).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "config/label-configs/candidate-evaluation.xml"
    )]
    pub label_config: PathBuf,
    /// Description of a newly created project.
    #[arg(long, default_value = "Created by batchlab")]
    pub description: String,
    /// batchlab-ml-backend's URL as Label Studio reaches it [default: http://127.0.0.1:<ml_backend.port>].
    #[arg(long, value_name = "URL")]
    pub ml_backend_url: Option<String>,
    /// Title of a newly connected ML backend.
    #[arg(long, default_value = "batchlab")]
    pub ml_backend_title: String,
    /// batchlab-api's webhook URL as Label Studio reaches it, without the instance
    /// [default: http://127.0.0.1:<api.port>/v1/webhooks/label-studio]; the webhook registered
    /// is this URL followed by `/<label_studio.instance>`, so that its deliveries are kept
    /// apart from any other Label Studio's.
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// Connect no ML backend.
    #[arg(long)]
    pub no_ml_backend: bool,
    /// Register no webhook.
    #[arg(long)]
    pub no_webhook: bool,
}

/// Why `batchlab-api setup`'s arguments cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupArgsError {
    /// The labeling config file could not be read.
    #[error("cannot read labeling config {}", path.display())]
    LabelConfig {
        /// The file named by `--label-config`.
        path: std::path::PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
}

impl SetupArgs {
    /// The setup to run, with defaults and the secret header taken from `config`.
    pub fn options(&self, config: &Config) -> Result<SetupOptions, SetupArgsError> {
        let label_config = std::fs::read_to_string(&self.label_config).map_err(|source| {
            SetupArgsError::LabelConfig {
                path: self.label_config.clone(),
                source,
            }
        })?;
        let ml_backend_url = (!self.no_ml_backend).then(|| {
            self.ml_backend_url
                .clone()
                .unwrap_or_else(|| format!("http://127.0.0.1:{}", config.ml_backend.port))
        });
        let base = self.webhook_url.clone().unwrap_or_else(|| {
            format!(
                "http://127.0.0.1:{}/v1/webhooks/label-studio",
                config.api.port
            )
        });
        let instance = &config.label_studio.instance;
        let base = base.trim_end_matches('/');
        let suffix = format!("/{instance}");
        let base = base.strip_suffix(&suffix).unwrap_or(base).to_owned();
        let webhook_url = (!self.no_webhook).then(|| format!("{base}{suffix}"));
        // A webhook registered before instances existed (the URL without one) delivers to the
        // configured instance too: it is updated in place rather than doubled.
        let webhook_replaces = webhook_url.as_ref().map(|_| base);
        let ls = &config.label_studio;
        let webhook_header = ls
            .webhook_secret
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|s| (ls.webhook_secret_header.clone(), s.clone()));
        let ml = &config.ml_backend;
        let ml_backend_basic_auth = match (&ml.basic_auth_user, &ml.basic_auth_pass) {
            (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Some((u.clone(), p.clone())),
            _ => None,
        };
        Ok(SetupOptions {
            title: self.title.clone(),
            label_config,
            description: self.description.clone(),
            ml_backend_url,
            ml_backend_title: self.ml_backend_title.clone(),
            ml_backend_basic_auth,
            webhook_url,
            webhook_replaces,
            webhook_header,
        })
    }
}
