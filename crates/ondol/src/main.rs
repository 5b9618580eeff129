//! `ondol`: train and inspect models. See `ondol --help`.

use clap::{Args, Parser, Subcommand};
use ondol::config::{Device, RunConfig};
use ondol::metrics::Metrics;
use ondol::prepare_cli;
use ondol::trainer::{self, Data, Trainer};
use ondol_core::{Backend, Error, Result};
use ondol_cpu::CpuBackend;
use ondol_model::Transformer;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ondol", version, about = "LLM pretraining from the floor up")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML config.
    Train(TrainArgs),
    /// Print parameter count, FLOPs per token and memory of a config.
    Inspect(ConfigArgs),
    /// Tokenizer training.
    #[command(subcommand)]
    Tokenizer(prepare_cli::TokenizerCommand),
    /// Data preparation: raw text to token shards.
    #[command(subcommand)]
    Data(prepare_cli::DataCommand),
}

#[derive(Args)]
struct ConfigArgs {
    /// The run config (TOML).
    config: PathBuf,
    /// Override a config value, e.g. --set training.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Where metrics and the resolved config go (default: runs/<config name>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Inspect(args) => inspect(args),
        Command::Tokenizer(cmd) => prepare_cli::tokenizer(cmd),
        Command::Data(cmd) => prepare_cli::data(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(&args.config.config, &args.config.set)?;
    if cfg.training.device == Device::Cuda {
        return Err(Error::config("training.device", "\"cuda\": this build has no CUDA backend; use \"cpu\""));
    }
    if let Some(threads) = cfg.training.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| Error::config("training.threads", e.to_string()))?;
    }
    // Everything a user's input can break is checked before the run directory is touched.
    let data = Data::open(&cfg, Path::new("."))?;
    let (steps, seq) = (cfg.training.steps, cfg.training.seq_len);
    let resolved = toml::to_string(&cfg).expect("config serializes");
    let mut trainer = Trainer::new(CpuBackend::new(), cfg, data)?;

    let stem = args.config.config.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned());
    let run_dir = args.run_dir.unwrap_or_else(|| Path::new("runs").join(stem));
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(format!("cannot create {}", run_dir.display()), e))?;
    let resolved_path = run_dir.join("ondol.toml");
    std::fs::write(&resolved_path, resolved)
        .map_err(|e| Error::io(format!("cannot write {}", resolved_path.display()), e))?;
    let peak = ondol_cpu::measure_gemm_peak();
    let m = &trainer.model;
    eprintln!(
        "ondol {}: {:?} model, {:.2}M parameters, {:.1} MFLOP/token, {} tokens/step on {}; \
         MFU against the measured sgemm peak {:.0} GFLOP/s; run dir {}",
        env!("CARGO_PKG_VERSION"),
        m.cfg.arch,
        m.num_params() as f64 / 1e6,
        m.flops_per_token(seq) as f64 / 1e6,
        trainer.tokens_per_step(),
        trainer.be.name(),
        peak / 1e9,
        run_dir.display()
    );
    let mut metrics = Metrics::create(&run_dir, steps, peak)?;
    let summary = trainer::run(&mut trainer, &mut metrics)?;
    metrics.finish();
    let val = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    eprintln!(
        "done: {} steps in {:.1} s, {:.0} tokens/s; train loss {:.4} -> {:.4}; val loss {} -> {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s,
        summary.first_loss,
        summary.final_loss,
        val(summary.first_val_loss),
        val(summary.final_val_loss)
    );
    Ok(())
}

fn inspect(args: ConfigArgs) -> Result<()> {
    let cfg = RunConfig::load(&args.config, &args.set)?;
    let model = Transformer::new(cfg.model.clone())?;
    let t = &cfg.training;
    let n = model.num_params() as u64;
    let state = 16 * n; // f32 params, grads, two AdamW moments
    let acts = model.activation_bytes(t.batch_size, t.seq_len);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("arch                 {:?}", cfg.model.arch);
    println!("parameters           {n} ({:.2}M)", n as f64 / 1e6);
    println!("  in matmuls (N)     {} (non-embedding + output head)", model.num_flop_params());
    println!("FLOPs/token          {} (6N + 12 L d T at T = {})", model.flops_per_token(t.seq_len), t.seq_len);
    println!("tokens/step          {}", t.batch_size * t.seq_len * t.grad_accum);
    println!(
        "memory (f32)         {:.3} GiB weights+grads+AdamW, {:.3} GiB activations (micro-batch {} x {})",
        gib(state),
        gib(acts),
        t.batch_size,
        t.seq_len
    );
    Ok(())
}
