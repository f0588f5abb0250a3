//! The `modelwatch` binary: CLI, telemetry init, config load, run until shutdown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use modelwatch::config::{self, Config, LogFormat};
use modelwatch::generate::{DriftScenario, Generator, ProduceOptions, Scenario};
use modelwatch::ingest::decode;
use modelwatch::model::InputEvent;
use modelwatch::sinks::clickhouse::ClickHouseSink;
use modelwatch::{alerting, app, demo, pipeline, telemetry};

/// Real-time monitoring of machine-learning models in production.
#[derive(Parser, Debug)]
#[command(name = "modelwatch", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). Every key can also be set with
    /// MODELWATCH_<SECTION>__<KEY>, e.g. MODELWATCH_KAFKA__BROKERS.
    #[arg(long, short, global = true, env = "MODELWATCH_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service: consume, join, compute, write, alert.
    Run(RunArgs),
    /// Everything on embedded defaults: an in-process Kafka cluster, synthetic
    /// traffic that drifts and degrades, the local ClickHouse.
    Demo(DemoArgs),
    /// Produce synthetic events into a real broker.
    Generate(GenerateArgs),
    /// Create or upgrade the ClickHouse database and tables.
    Migrate,
    /// Reference profiles.
    Reference {
        #[command(subcommand)]
        command: ReferenceCommand,
    },
    /// Validate the configuration and print what the alert rules watch.
    CheckConfig,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Exit once the input has been idle for windows.idle_timeout, after
    /// closing every window (replays and backfills of a finite stream).
    #[arg(long)]
    exit_when_idle: bool,
    /// Discard the state in state.dir first (its pending predictions and
    /// open windows are lost): for a state.dir that belonged to another
    /// pipeline, or a deliberate fresh start.
    #[arg(long)]
    reset_state: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Predictions to generate (per model version).
    #[arg(long, default_value_t = 60_000)]
    events: u64,
    /// Event-time rate of the synthetic traffic (predictions per second).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Random seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Exit after the summary instead of serving the dashboard until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WireFormat {
    Json,
    Avro,
    ConfluentAvro,
    SingleObject,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Bootstrap brokers (default: kafka.brokers of the configuration).
    #[arg(long)]
    brokers: Option<String>,
    /// Predictions to generate (per model version).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Messages per wall-clock second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Event-time rate (predictions per second of event time).
    #[arg(long, default_value_t = 50.0)]
    event_rate: f64,
    /// Model id.
    #[arg(long, default_value = "fraud-detector")]
    model: String,
    /// Model versions scoring every request (champion first).
    #[arg(long, value_delimiter = ',', default_value = "v1,v2")]
    versions: Vec<String>,
    /// Drift scenario: none, sudden, gradual.
    #[arg(long, default_value = "sudden")]
    drift: String,
    /// Where in the stream the drift starts (0..1).
    #[arg(long, default_value_t = 0.5)]
    drift_at: f64,
    /// Payload encoding.
    #[arg(long, value_enum, default_value_t = WireFormat::Json)]
    format: WireFormat,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Event time of the first prediction, ms since the epoch (default: so that the stream ends now).
    #[arg(long)]
    start_ms: Option<i64>,
}

#[derive(Subcommand, Debug)]
enum ReferenceCommand {
    /// Build a version's reference profile from a JSON Lines file of
    /// PredictionEvents and store it in ClickHouse.
    Import {
        /// Model id.
        #[arg(long)]
        model: String,
        /// Model version.
        #[arg(long)]
        version: String,
        /// JSON Lines file of PredictionEvents.
        file: PathBuf,
    },
}

// mimalloc: the hot path allocates per event (decoded strings), and glibc's
// malloc spent about a quarter of it consolidating fast bins (perf profile of
// benches/core.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let env: HashMap<String, String> = std::env::vars().collect();
    config::load(path.map(PathBuf::as_path), &env)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match load_config(cli.config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // The demo prints its own progress and summary: only errors go to the
    // log unless a level is configured.
    let default_filter = match cli.command {
        Command::Demo(_) if cfg.service.log_level == "info" => "error",
        _ => cfg.service.log_level.as_str(),
    };
    telemetry::init(cfg.service.log_format == LogFormat::Json, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Errors can quote what a library got (a URL, a property): secrets out.
    let secrets = cfg.secret_values();
    match runtime.block_on(dispatch(cli.command, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", config::redact(&format!("{e:#}"), &secrets));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, cfg: Config) -> Result<()> {
    match command {
        Command::Run(a) => app::run(cfg, a.exit_when_idle, a.reset_state).await,
        Command::Demo(a) => {
            demo::run(
                cfg,
                demo::DemoOptions {
                    events: a.events,
                    rate: a.rate,
                    seed: a.seed,
                    serve: !a.exit,
                },
            )
            .await
        }
        Command::Generate(a) => generate(cfg, a).await,
        Command::Migrate => {
            let sink = ClickHouseSink::new(&cfg.clickhouse);
            sink.migrate().await.map_err(|e| {
                anyhow::anyhow!(
                    "migration against {} failed: {e}",
                    cfg.clickhouse.display_url()
                )
            })?;
            println!(
                "database {} at {} is up to date",
                cfg.clickhouse.database,
                cfg.clickhouse.display_url()
            );
            Ok(())
        }
        Command::Reference {
            command:
                ReferenceCommand::Import {
                    model,
                    version,
                    file,
                },
        } => {
            let drift = pipeline::drift_config(&cfg);
            let profile = app::build_reference_from_file(&file, &model, &version, &drift)?;
            let json = serde_json::to_string(&profile).context("cannot serialize the profile")?;
            let sink = ClickHouseSink::new(&cfg.clickhouse);
            sink.migrate().await.map_err(|e| {
                anyhow::anyhow!(
                    "migration against {} failed: {e}",
                    cfg.clickhouse.display_url()
                )
            })?;
            sink.save_reference(&model, &version, profile.sample_count, &json)
                .await
                .map_err(|e| anyhow::anyhow!("cannot store the profile: {e}"))?;
            println!(
                "reference profile of {model} {version}: {} events, {} features stored; running services load it at their next start",
                profile.sample_count,
                profile.feature_names().count()
            );
            Ok(())
        }
        Command::CheckConfig => {
            modelwatch::ingest::consumer::check_client_config(&cfg.kafka)?;
            println!("configuration is valid");
            println!(
                "kafka: brokers={} topics: predictions={} ground-truth={} alerts={} dead-letter={} format={:?}",
                cfg.kafka.brokers,
                cfg.kafka.predictions_topic,
                cfg.kafka.ground_truth_topic,
                cfg.kafka.alerts_topic,
                cfg.kafka.dead_letter_topic,
                cfg.kafka.format
            );
            let prop = |k: &str| cfg.kafka.properties.get(k).map_or("-", String::as_str);
            println!(
                "kafka security: protocol={} sasl.mechanism={} sasl.username={} ssl.ca.location={}",
                prop("security.protocol"),
                cfg.kafka
                    .properties
                    .get("sasl.mechanism")
                    .or_else(|| cfg.kafka.properties.get("sasl.mechanisms"))
                    .map_or("-", String::as_str),
                prop("sasl.username"),
                prop("ssl.ca.location")
            );
            let shape = |mapped: bool| if mapped { "mapped" } else { "ours" };
            let r = &cfg.kafka.schema_registry;
            if r.enabled() {
                // Builds the client: a ca_file without a certificate fails here.
                modelwatch::ingest::registry::Registry::new(r, Default::default())?;
                println!(
                    "schema registry: url={} username={} ca_file={} alerts={:?}",
                    r.display_url(),
                    if r.username.is_empty() {
                        "-"
                    } else {
                        &r.username
                    },
                    if r.ca_file.is_empty() {
                        "-"
                    } else {
                        &r.ca_file
                    },
                    r.alerts
                );
            } else {
                println!("schema registry: none (Confluent frames are read with our schema)");
            }
            println!(
                "kafka record shape ([kafka.mapping]): predictions={} labels={}",
                shape(cfg.kafka.mapping.predictions.is_some()),
                shape(cfg.kafka.mapping.labels.is_some())
            );
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            println!(
                "clickhouse: url={} database={} user={} tls={} ca_file={} client_cert_file={}",
                cfg.clickhouse.display_url(),
                cfg.clickhouse.database,
                cfg.clickhouse.user,
                if cfg.clickhouse.url.trim().starts_with("https://") {
                    "rustls (system roots + ca_file)"
                } else {
                    "off"
                },
                or_dash(&cfg.clickhouse.ca_file),
                or_dash(&cfg.clickhouse.client_cert_file)
            );
            println!(
                "windows: sizes={} lateness={} idle_timeout={} label_horizon={} early_label_ttl={}",
                cfg.windows
                    .sizes
                    .iter()
                    .map(|d| humantime::format_duration(*d).to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                humantime::format_duration(cfg.windows.allowed_lateness),
                humantime::format_duration(cfg.windows.idle_timeout),
                humantime::format_duration(cfg.windows.label_horizon),
                humantime::format_duration(cfg.windows.early_label_ttl)
            );
            let rules = alerting::compile(&cfg);
            println!(
                "alert rules ({}; statistical gate {} at {}% confidence):",
                rules.len(),
                if cfg.alerts.statistical_gate {
                    "on"
                } else {
                    "off"
                },
                cfg.alerts.confidence * 100.0
            );
            for r in rules {
                println!("  {}", r.describe());
            }
            let env: HashMap<String, String> = std::env::vars().collect();
            println!("webhooks ({}):", cfg.alerts.webhooks.len());
            let mut missing = 0;
            for w in &cfg.alerts.webhooks {
                // Resolves URL and secret to check them; never prints either.
                let state = match w.resolve(&env) {
                    Ok(_) => "url and secret found".to_string(),
                    Err(e) => {
                        missing += 1;
                        format!("NOT READY: {e:#}")
                    }
                };
                let rules = if w.rules.is_empty() {
                    "every rule".to_string()
                } else {
                    w.rules.join(", ")
                };
                println!(
                    "  {} ({}): {} and above, {rules}, resolutions {}, timeout {}, {} attempts; {state}",
                    w.name,
                    w.kind.as_str(),
                    w.min_severity.as_str(),
                    if w.send_resolved { "sent" } else { "not sent" },
                    humantime::format_duration(w.timeout),
                    w.max_attempts
                );
            }
            if missing > 0 {
                anyhow::bail!("{missing} webhook(s) cannot be used: see above");
            }
            Ok(())
        }
    }
}

async fn generate(cfg: Config, a: GenerateArgs) -> Result<()> {
    let drift: DriftScenario = a
        .drift
        .parse()
        .map_err(|e| anyhow::anyhow!("--drift: {e}"))?;
    let duration_ms = (a.count as f64 / a.event_rate.max(1e-9) * 1000.0) as i64;
    let start_ms = a.start_ms.unwrap_or_else(|| app::now_ms() - duration_ms);
    let scenario = Scenario {
        seed: a.seed,
        start_ms,
        events_per_second: a.event_rate,
        count: a.count,
        versions: a.versions.clone(),
        model_id: a.model.clone(),
        drift,
        drift_at: a.drift_at,
        ..Scenario::default()
    };
    let opts = ProduceOptions {
        brokers: a.brokers.unwrap_or_else(|| cfg.kafka.brokers.clone()),
        predictions_topic: cfg.kafka.predictions_topic.clone(),
        ground_truth_topic: cfg.kafka.ground_truth_topic.clone(),
        rate_limit: (a.rate > 0.0).then_some(a.rate),
        properties: cfg.kafka.properties.clone(),
        pace: None,
    };
    let format = a.format;
    let encode = move |ev: &InputEvent| -> Vec<u8> {
        match format {
            WireFormat::Json => decode::encode_json(ev),
            WireFormat::Avro => decode::encode_avro(ev),
            WireFormat::ConfluentAvro => decode::encode_confluent(ev, 1),
            WireFormat::SingleObject => decode::encode_single_object(ev),
        }
    };
    eprintln!(
        "producing {} predictions per version ({}) of {} to {} ...",
        a.count,
        a.versions.join(","),
        a.model,
        opts.brokers
    );
    let mut progress = |n: u64| eprintln!("  {n} messages sent");
    let summary =
        modelwatch::generate::produce(Generator::new(scenario), &opts, &encode, &mut progress)
            .await?;
    println!(
        "sent {} predictions and {} labels in {:.1}s ({:.0} msg/s)",
        summary.predictions,
        summary.labels,
        summary.elapsed.as_secs_f64(),
        (summary.predictions + summary.labels) as f64 / summary.elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}
