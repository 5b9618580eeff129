//! `ondol`: train and inspect models. See `ondol --help`.

use clap::{Args, Parser, Subcommand};
use ondol::config::{Device, Precision, RunConfig};
use ondol::dir_lock::{DirLock, Purpose};
use ondol::launch::{self, LaunchArgs, SelftestArgs};
use ondol::metrics::Metrics;
use ondol::prepare_cli;
use ondol::pretrained::{self, Generation, Pretrained, Sampling, TextStream, Tokenizer};
use ondol::stop_signal;
use ondol::trainer::{self, Data, DataPosition, Trainer};
use ondol_ckpt::{Loaded, Writer, checkpoint};
use ondol_comm::{Communicator, DistEnv, Mesh, RankComms, TcpNet};
use ondol_core::{Backend, Error, Result};
use ondol_cpu::CpuBackend;
use ondol_data::prepare::ShardTokenizer;
use ondol_data::{Loader, Order, SourceKind, TokenStream};
use ondol_model::{Arch, BlockNorms, MicroBatch, Model, ModelConfig, Part, Workspace, scratch_elems};
use ondol_parallel::{HEAD_ROW_ALIGN, ScheduleKind, schedule};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

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
    /// Print parameter count, FLOPs per token and memory of a config, checkpoint or run.
    Inspect(InspectArgs),
    /// Loss and perplexity of a checkpoint or Hugging Face model on token data.
    Eval(EvalArgs),
    /// Sample text from a checkpoint or Hugging Face model.
    Generate(GenerateArgs),
    /// Turn another framework's model into an ondol checkpoint.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Start one process per rank with torchrun's environment: `launch --nproc-per-node 8 -- train CONFIG`.
    Launch(LaunchArgs),
    /// Check a launched job's rendezvous (store, barrier, exchange) without a model.
    #[command(hide = true)]
    CommSelftest(SelftestArgs),
    /// Tokenizer training.
    #[command(subcommand)]
    Tokenizer(prepare_cli::TokenizerCommand),
    /// Data preparation: raw text to token shards.
    #[command(subcommand)]
    Data(prepare_cli::DataCommand),
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A Hugging Face model directory (config.json + safetensors): Llama, Mistral, Qwen2, Qwen3, SmolLM3, EXAONE 3
    /// and 4, HyperCLOVA X, Granite, Gemma 3 (its text model), GPT-2, Mamba, Mamba-2 or Nemotron-H.
    Hf {
        /// The Hugging Face model directory.
        src: PathBuf,
        /// The checkpoint directory to write (new, or empty).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint or Hugging Face model directory, or a run directory (its latest checkpoint);
    /// before --data, or as its last value.
    dir: Option<PathBuf>,
    /// Token shards (.bin) or, for byte-level models, text files; paths or globs.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<String>,
    /// Batches to evaluate (default: the whole data, once).
    #[arg(long)]
    batches: Option<usize>,
    /// Sequences per batch (default: the checkpoint's training.batch_size, else 8).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (default: the checkpoint's training.seq_len, else up to 1024).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Where to run: cpu, or cuda (GPU 0, in bf16; a build with --features cuda).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Print one JSON object: {"loss", "perplexity", "tokens", "batches"}.
    #[arg(long)]
    json: bool,
    /// Documents packed into a sequence attend only within their own: `--mask-documents` or
    /// `--mask-documents=false` (default: as the checkpoint's run trained,
    /// training.mask_documents).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    mask_documents: Option<bool>,
}

#[derive(Args)]
struct GenerateArgs {
    /// A checkpoint or Hugging Face model directory, or a run directory (its latest checkpoint).
    dir: PathBuf,
    /// The text to continue; empty: a text from its start (after an end-of-text).
    #[arg(long)]
    prompt: String,
    /// At most this many tokens after the prompt (fewer where the model's context ends).
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// 0 always takes the most likely token.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to p.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run: cpu, or cuda (GPU 0, in bf16; a build with --features cuda).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// The prompt is a user's message to a chat model: rendered by the model's chat template
    /// (chat_template.jinja, else tokenizer_config.json's) with the assistant's header after
    /// it; the reply ends at the end-of-text, the eos_token or the template's end-of-turn, and
    /// only the reply is shown.
    #[arg(long)]
    chat: bool,
}

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda),
        _ => Err(format!("\"{s}\" is not a device: cpu or cuda")),
    }
}

#[derive(Args)]
struct ConfigArgs {
    /// The run config (TOML).
    config: PathBuf,
    /// Override a config value, e.g. --set training.steps=100 or data.sources[1].weight=0.5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct InspectArgs {
    /// A run config (TOML), or a checkpoint or run directory (the config it was trained with).
    config: PathBuf,
    /// Of a checkpoint: read every file and check its checksum, as a resume does.
    #[arg(long)]
    verify: bool,
    /// Override a config value, e.g. --set parallelism.tp=8 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Where metrics, checkpoints and the resolved config go (default: runs/<config name>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue from a checkpoint: `auto` (the one the run wrote last, else the newest
    /// intact; without one, `checkpoint.resume_from` if set, which a run without --resume
    /// starts from too) or a checkpoint directory.
    #[arg(long, value_name = "auto|DIR")]
    resume: Option<String>,
}

impl TrainArgs {
    /// Where the run writes: --run-dir, else runs/<config name>.
    fn run_dir(&self) -> PathBuf {
        let stem = self.config.config.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned());
        self.run_dir.clone().unwrap_or_else(|| Path::new("runs").join(stem))
    }
}

/// Writes a line of a command's answer to standard output, returning an error where it cannot
/// (a full disk), where `println!` would panic.
macro_rules! answer {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(|e| Error::io("cannot write to standard output", e))?
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Inspect(_) | Command::Eval(_) | Command::Generate(_)) {
        // An answer piped into a reader that has seen enough (`| head`) ends the command quietly,
        // as it does any Unix tool. (Rust ignores SIGPIPE, which keeps a run training when the
        // reader of its log goes away: `say!` carries on past a closed standard error.)
        // SAFETY: no other thread exists yet, and SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let done = |result: Result<()>| result.map(|()| RunEnd::Finished);
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Inspect(args) => done(inspect(args)),
        Command::Eval(args) => done(eval(args)),
        Command::Generate(args) => done(generate(args)),
        Command::Import(ImportCommand::Hf { src, out }) => done(model_dir(&src).and_then(|src| import_hf(&src, &out))),
        Command::Launch(args) => launch::launch(args).map(|stopped| stopped.map_or(RunEnd::Finished, RunEnd::Stopped)),
        Command::CommSelftest(args) => done(launch::selftest(args)),
        Command::Tokenizer(cmd) => done(prepare_cli::tokenizer(cmd)),
        Command::Data(cmd) => done(prepare_cli::data(cmd)),
    };
    match result {
        Ok(RunEnd::Finished) => ExitCode::SUCCESS,
        Ok(RunEnd::Stopped(status)) => ExitCode::from(status),
        Err(e) => {
            // One write, so a rank the launcher stops meanwhile leaves all of the line or none.
            let _ = std::io::stderr().write_all(format!("error: {e}\n").as_bytes());
            ExitCode::FAILURE
        }
    }
}

/// How a command ended, an error aside.
#[derive(Clone, Copy, Debug, PartialEq)]
enum RunEnd {
    Finished,
    /// A training run stopped on request before its last step, with a checkpoint: the exit
    /// status, 128 + the signal that asked, as the shell reports a process the signal ended.
    Stopped(u8),
}

impl RunEnd {
    fn of(summary: &trainer::Summary) -> Self {
        match summary.stopped_by {
            Some(sig) => Self::Stopped(128 + sig as u8),
            None => Self::Finished,
        }
    }
}

fn train(args: TrainArgs) -> Result<RunEnd> {
    stop_signal::catch_sigusr1();
    let cfg = RunConfig::load(&args.config.config, &args.config.set)?;
    let env = DistEnv::from_env()?;
    // A launched job (torchrun's variables, as `ondol launch` sets them, or Slurm's), even of
    // one process, meets through the store and trains over TCP or NCCL.
    let launched = env.world_size > 1 || std::env::var_os("RANK").is_some();
    if launched {
        // Before rank 0 takes the run directory: a rank refused by the layout every rank
        // checks may take rank 0 down (the launcher stops it) before it could let go of it.
        check_launched_layout(&cfg, env.world_size)?;
    }
    // The run directory is rank 0's (the launched ranks after it stop when it stops), held for
    // the whole run; checked before any rank starts, so that a refusal leaves none waiting.
    let _run_dir = if env.rank == 0 {
        let lock = DirLock::take(&args.run_dir(), Purpose::Run)?;
        refuse_a_run_over_another(&args, &cfg)?;
        Some(lock)
    } else {
        None
    };
    // Launched ranks on one node share its cores: each takes its share unless told.
    let threads = cfg.training.threads.or_else(|| {
        (env.local_world_size > 1).then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / env.local_world_size).max(1)
        })
    });
    if let Some(threads) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| Error::config("training.threads", e.to_string()))?;
    }
    if launched {
        return train_launched(&args, cfg, &env);
    }
    if cfg.training.device == Device::Cuda {
        return train_cuda(&args, cfg);
    }
    check_fits_in_memory(&cfg)?;
    let data = Data::open(&cfg, Path::new("."))?;
    let p = &cfg.parallelism;
    let mesh = Mesh::new(p.tp, p.pp, p.dp)?;
    let peak = Peak::cpu_thread_ranks(mesh.world());
    if mesh.world() == 1 {
        return train_rank(&args, CpuBackend::new(), &peak, cfg, data, None);
    }
    // Every rank of the mesh as a thread of this process, with its communicators.
    let comms = RankComms::threads(mesh, Duration::from_secs(p.timeout_s))?;
    let results: Vec<Result<RunEnd>> = std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (args, peak, cfg, data) = (&args, &peak, cfg.clone(), data.clone());
                scope.spawn(move || train_rank(args, CpuBackend::new(), peak, cfg, data, Some(comm.boxed())))
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap_or_else(|_| Err(Error::Training("a rank panicked".into())))).collect()
    });
    let ends = results.into_iter().collect::<Result<Vec<_>>>()?;
    // (Every rank stops after the same step, on the same signal.)
    Ok(ends.into_iter().find(|end| *end != RunEnd::Finished).unwrap_or(RunEnd::Finished))
}

/// Refuses a layout that does not cover the `world` launched processes.
fn check_launched_layout(cfg: &RunConfig, world: usize) -> Result<()> {
    let p = &cfg.parallelism;
    let model_parallel = p.tp * p.pp;
    if p.tp * p.pp * p.dp == world {
        return Ok(());
    }
    let fix = if world.is_multiple_of(model_parallel) {
        format!("set parallelism.dp = {} (with tp = {} and pp = {})", world / model_parallel, p.tp, p.pp)
    } else {
        format!("choose tp x pp x dp = {world}")
    };
    Err(Error::config(
        "parallelism",
        format!("tp {} x pp {} x dp {} is not the {world} processes launched; {fix}", p.tp, p.pp, p.dp),
    ))
}

/// This process as one rank of a launched job (`ondol launch`, torchrun-style variables, or
/// Slurm): the mesh must cover every launched process; ranks find each other through the
/// rendezvous store on MASTER_ADDR:MASTER_PORT and talk over TCP (CPU) or NCCL (CUDA).
fn train_launched(args: &TrainArgs, cfg: RunConfig, env: &DistEnv) -> Result<RunEnd> {
    if cfg.training.device == Device::Cuda {
        return train_launched_cuda(args, cfg, env);
    }
    let (job, net) = saying_while_waiting(&cfg, env, || {
        let mut job = Job::join(&cfg, env)?;
        let net = TcpNet::connect(&mut job.store, env.world_size, job.timeout)?;
        Ok((job, net))
    })?;
    let mesh = job.mesh;
    let (data, peak) = job.open_data(&cfg, env, || Peak::cpu(env.world_size))?;
    train_rank(args, CpuBackend::new(), &peak, cfg, data, Some(RankComms::tcp(mesh, &net)?.boxed()))
}

/// Runs `meet` (the ranks finding each other), saying once, on each node's first rank, when it
/// has waited half of `parallelism.timeout_s` (at most 10 s): a node that never comes would
/// otherwise leave the job silent until the timeout.
fn saying_while_waiting<T>(cfg: &RunConfig, env: &DistEnv, meet: impl FnOnce() -> Result<T>) -> Result<T> {
    let timeout = cfg.parallelism.timeout_s;
    let patience = Duration::from_secs(timeout).min(Duration::from_secs(20)) / 2;
    let (done, waiting) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        if env.local_rank == 0 {
            scope.spawn(move || {
                if waiting.recv_timeout(patience) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    ondol_core::say!(
                        "rank {}: waiting for the job's {} ranks to meet at {}:{} (parallelism.timeout_s = {timeout})",
                        env.rank,
                        env.world_size,
                        env.master_addr,
                        env.master_port
                    );
                }
            });
        }
        let met = meet();
        drop(done);
        met
    })
}

/// A launched job while its ranks meet: the layout (checked against the launched processes)
/// and the rendezvous store, which rank 0 serves until every rank is connected and has its data.
struct Job {
    mesh: Mesh,
    timeout: Duration,
    server: Option<ondol_comm::StoreServer>,
    store: ondol_comm::StoreClient,
}

impl Job {
    fn join(cfg: &RunConfig, env: &DistEnv) -> Result<Job> {
        check_launched_layout(cfg, env.world_size)?;
        let p = &cfg.parallelism;
        let mesh = Mesh::new(p.tp, p.pp, p.dp)?;
        let timeout = Duration::from_secs(p.timeout_s);
        let (server, store) = ondol_comm::store::rendezvous(env, timeout)?;
        Ok(Job { mesh, timeout, server, store })
    }

    /// Rank 0 prepares the data (a config may ask for it on the first run) and takes the
    /// job's `peak` while the other ranks wait, so neither is disturbed by them; then the
    /// store closes. Preparing may take far longer than a collective; if rank 0 fails, its
    /// store goes with it and the wait ends at once.
    fn open_data(mut self, cfg: &RunConfig, env: &DistEnv, peak: impl FnOnce() -> Peak) -> Result<(Data, Peak)> {
        self.store.set_timeout(Duration::from_secs(7 * 24 * 3600));
        let opened = if env.rank == 0 {
            let data = Data::open(cfg, Path::new("."));
            let peak = peak();
            self.store.barrier("train/data", env.world_size)?;
            (data?, peak)
        } else {
            self.store.barrier("train/data", env.world_size)?;
            (Data::open(cfg, Path::new("."))?, Peak { flops: 1.0, what: String::new() })
        };
        drop(self.store);
        if let Some(server) = self.server {
            server.shutdown(self.timeout);
        }
        Ok(opened)
    }
}

/// The denominator of MFU, and what it is.
struct Peak {
    flops: f64,
    what: String,
}

impl Peak {
    /// The CPU's measured f32 GEMM throughput (DESIGN.md section 7) in this process's
    /// threads, times the `processes` of a launched job: each measures as much with its own
    /// share of its node's cores (rank 0 measures while the others wait).
    fn cpu(processes: usize) -> Self {
        let flops = ondol_cpu::measure_gemm_peak();
        let what = format!("the measured sgemm peak {:.0} GFLOP/s", flops / 1e9);
        match processes {
            1 => Self { flops, what },
            n => Self { flops: flops * n as f64, what: format!("{n} ranks x {what} of one rank's threads") },
        }
    }

    /// [`Self::cpu`] for `ranks` ranks run as threads of this process. Each computes on a
    /// thread of its own beside the shared pool (GEMMs too small to share out run there), so
    /// together they use up to `ranks` cores however few threads the pool has: the pool's
    /// peak is scaled to the cores they can use (else `training.threads = 1` over two thread
    /// ranks showed an MFU near 100 % against one core's peak).
    fn cpu_thread_ranks(ranks: usize) -> Self {
        let one = Self::cpu(1);
        let pool = rayon::current_num_threads();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let usable = pool.max(ranks.min(cores));
        match usable == pool {
            true => one,
            false => Self {
                flops: one.flops * usable as f64 / pool as f64,
                what: format!(
                    "{} of the pool's {pool} thread(s), scaled to the {usable} cores {ranks} thread ranks use",
                    one.what
                ),
            },
        }
    }
}

/// Training on GPU 0 as the only rank; several GPUs are several launched processes.
#[cfg(feature = "cuda")]
fn train_cuda(args: &TrainArgs, cfg: RunConfig) -> Result<RunEnd> {
    let p = &cfg.parallelism;
    if p.tp * p.pp * p.dp > 1 {
        return Err(Error::config(
            "parallelism",
            format!(
                "tp {} x pp {} x dp {} ranks on \"cuda\" are one process per GPU: ondol launch --nproc-per-node {} \
                 -- train ...",
                p.tp,
                p.pp,
                p.dp,
                p.tp * p.pp * p.dp
            ),
        ));
    }
    let (be, peak) = open_gpu(&cfg, 0)?;
    let data = Data::open(&cfg, Path::new("."))?;
    train_rank(args, be, &peak, cfg, data, None)
}

/// One launched rank on the GPU of its local rank, talking to the others through NCCL
/// (pipeline stages too: their activations and gradients stay in device memory).
#[cfg(feature = "cuda")]
fn train_launched_cuda(args: &TrainArgs, cfg: RunConfig, env: &DistEnv) -> Result<RunEnd> {
    let (be, gpu) = open_gpu(&cfg, env.local_rank)?;
    let stream = be.stream().expect("a GPU backend has a stream");
    let (job, comms) = saying_while_waiting(&cfg, env, || {
        let mut job = Job::join(&cfg, env)?;
        let comms = RankComms::nccl(job.mesh, env.rank, &mut job.store, &stream, job.timeout)?;
        Ok((job, comms))
    })?;
    let world = env.world_size;
    let peak = || Peak { flops: gpu.flops * world as f64, what: format!("{world} x {}", gpu.what) };
    let (data, peak) = job.open_data(&cfg, env, peak)?;
    train_rank(args, be, &peak, cfg, data, Some(comms))
}

/// What the CUDA kernels can hold (registers in kernels/selective_scan.cu and conv1d.cu, shared
/// memory in ssd.cu and the q/k norms' backward in norms.cu), checked before a model runs on a GPU.
#[cfg(feature = "cuda")]
fn check_cuda_kernels(m: &ondol_model::ModelConfig) -> Result<()> {
    if m.arch == Arch::Mamba && m.ssm_state() > ondol_cuda::SCAN_MAX_STATE {
        return Err(Error::config(
            "model.ssm.state_size",
            format!(
                "{} states per channel: the CUDA selective scan keeps at most {}; use that or fewer",
                m.ssm_state(),
                ondol_cuda::SCAN_MAX_STATE
            ),
        ));
    }
    if matches!(m.arch, Arch::Mamba2 | Arch::Hybrid) && m.ssm.chunk_size > ondol_cuda::SSD_MAX_CHUNK {
        return Err(Error::config(
            "model.ssm.chunk_size",
            format!(
                "chunks of {} tokens: the CUDA SSD scan takes at most {} (Mamba-2 uses 256)",
                m.ssm.chunk_size,
                ondol_cuda::SSD_MAX_CHUNK
            ),
        ));
    }
    if m.has_qk_norm() && m.head_dim() > ondol_cuda::QK_NORM_MAX_HEAD_DIM {
        return Err(Error::config(
            "model.head_dim",
            format!(
                "heads of {} with model.qk_norm: the CUDA q/k norms take heads of at most {}",
                m.head_dim(),
                ondol_cuda::QK_NORM_MAX_HEAD_DIM
            ),
        ));
    }
    if matches!(m.arch, Arch::Mamba | Arch::Mamba2 | Arch::Hybrid)
        && !(1..=ondol_cuda::CONV_MAX_TAPS).contains(&m.ssm.conv_kernel)
    {
        return Err(Error::config(
            "model.ssm.conv_kernel",
            format!("{} taps: the CUDA convolution takes 1 to {}", m.ssm.conv_kernel, ondol_cuda::CONV_MAX_TAPS),
        ));
    }
    Ok(())
}

/// GPU 0 computing in bf16, for eval and generate.
#[cfg(feature = "cuda")]
fn inference_gpu(model: &Model) -> Result<ondol_cuda::CudaBackend> {
    check_cuda_kernels(&model.cfg)?;
    ondol_cuda::CudaBackend::open(0, ondol_cuda::Dtype::Bf16)
        .map_err(|e| Error::config("--device", format!("cuda: {e}")))
}

/// GPU `ordinal` with the config's precision, after the checks of what its kernels support,
/// and its peak for MFU.
#[cfg(feature = "cuda")]
fn open_gpu(cfg: &RunConfig, ordinal: usize) -> Result<(ondol_cuda::CudaBackend, Peak)> {
    use ondol_cuda::{CudaBackend, Dtype};
    check_cuda_kernels(&cfg.model)?;
    let compute = match cfg.training.compute_precision() {
        Precision::Fp32 => Dtype::F32,
        Precision::Bf16 => Dtype::Bf16,
    };
    let mut be =
        CudaBackend::open(ordinal, compute).map_err(|e| Error::config("training.device", format!("\"cuda\": {e}")))?;
    if !cfg.training.tensor_cores {
        be = be.without_tensor_cores();
    }
    // A model whose weights, gradients and AdamW state alone exceed the GPU would otherwise
    // stop at its first failed allocation (the fullest rank of the layout, as inspect counts).
    let rank = RankMemory::fullest(cfg)?;
    let gib = |b: u64| b as f64 / 2f64.powi(30);
    if let Some((_, total)) = be.device_memory() {
        let state = rank.weights_grads + rank.adamw;
        if state > total {
            return Err(Error::config(
                "model",
                format!(
                    "needs {:.1} GiB on a GPU for its weights, gradients and AdamW state before any activation (`ondol \
                     inspect` itemizes them), but {} has {:.1} GiB: split it over more GPUs (parallelism.tp, pp, \
                     zero = 1)",
                    gib(state),
                    be.device_name(),
                    gib(total)
                ),
            ));
        }
        if rank.total() > total && ordinal == 0 {
            ondol_core::say!(
                "note: about {:.1} GiB per GPU with activations (`ondol inspect`), more than the {:.1} GiB of {}: \
                 lower training.batch_size or turn on training.activation_checkpointing if it runs out",
                gib(rank.total()),
                gib(total),
                be.device_name()
            );
        }
    }
    let peak = match be.peak_flops() {
        Some(flops) => {
            Peak { flops, what: format!("the bf16 dense peak of {} ({:.0} TFLOP/s)", be.device_name(), flops / 1e12) }
        }
        None => {
            let flops = be.measure_gemm_peak();
            Peak { flops, what: format!("the measured bf16 GEMM peak {:.0} TFLOP/s", flops / 1e12) }
        }
    };
    Ok((be, peak))
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(_: &TrainArgs, _: RunConfig) -> Result<RunEnd> {
    Err(no_cuda_backend("training.device"))
}

#[cfg(not(feature = "cuda"))]
fn train_launched_cuda(_: &TrainArgs, _: RunConfig, _: &DistEnv) -> Result<RunEnd> {
    Err(no_cuda_backend("training.device"))
}

/// The error for `key` set to cuda in a build without the CUDA backend.
#[cfg(not(feature = "cuda"))]
fn no_cuda_backend(key: &str) -> Error {
    Error::config(key, "\"cuda\": this build has no CUDA backend (build with --features cuda); use \"cpu\"")
}

/// One rank's run (the only rank when `comm` is None). Rank 0 owns the run directory:
/// the resolved config, metrics and checkpoints; the others train silently beside it.
fn train_rank<B: Backend>(
    args: &TrainArgs,
    be: B,
    peak: &Peak,
    cfg: RunConfig,
    data: Data,
    comms: Option<RankComms<Box<dyn Communicator>>>,
) -> Result<RunEnd> {
    // Everything a user's input can break is checked before the run directory is touched.
    let (steps, seq) = (cfg.training.steps, cfg.training.seq_len);
    let resolved = toml::to_string(&cfg).expect("config serializes");
    let keep_last = cfg.checkpoint.keep_last;
    let mut trainer = match comms {
        None => Trainer::new(be, cfg, data)?,
        Some(c) => Trainer::rank(be, cfg, data, c)?,
    };
    trainer.check_every_rank_has_the_data()?;
    let run_dir = args.run_dir();
    let resumed = resume(&mut trainer, &run_dir, args.resume.as_deref())?;
    let init_from = match resumed {
        None => trainer.load_init_from()?,
        Some(_) => None,
    };
    match resumed {
        Some(step) if step > steps => {
            return Err(Error::config(
                "training.steps",
                format!("{steps} is below the step of the checkpoint resumed, {step}: raise it to train on"),
            ));
        }
        Some(step) if step == steps => {
            if trainer.is_leader() {
                ondol_core::say!(
                    "the run is already at step {step} = training.steps: nothing to train (raise training.steps)"
                );
            }
            return Ok(RunEnd::Finished);
        }
        _ => {}
    }
    // From here a signal stops the run after a step; before, nothing is lost when it ends it.
    stop_signal::catch_sigterm();
    if !trainer.is_leader() {
        let summary = trainer::run(&mut trainer, &mut Metrics::silent(1.0), None)?;
        return Ok(RunEnd::of(&summary));
    }
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(format!("cannot create {}", run_dir.display()), e))?;
    let resolved_path = run_dir.join("ondol.toml");
    std::fs::write(&resolved_path, resolved)
        .map_err(|e| Error::io(format!("cannot write {}", resolved_path.display()), e))?;
    let m = trainer.model();
    // (Masked documents attend fewer keys: each step counts its own, see StepStats::flops.)
    let unmasked = if trainer.cfg.training.mask_documents { " before masking documents" } else { "" };
    ondol_core::say!(
        "ondol {}: {:?} model, {:.2}M parameters, {:.1} MFLOP/token{unmasked}, {} tokens/step on {}, tp {} x pp {} \
         x dp {}; MFU against {}; run dir {}",
        env!("CARGO_PKG_VERSION"),
        m.cfg.arch,
        m.num_params() as f64 / 1e6,
        m.flops_per_token(seq) as f64 / 1e6,
        trainer.tokens_per_step(),
        trainer.engine.be.name(),
        trainer.cfg.parallelism.tp,
        trainer.cfg.parallelism.pp,
        trainer.cfg.parallelism.dp,
        peak.what,
        run_dir.display()
    );
    if let Some(init) = init_from {
        ondol_core::say!("model.init_from: starting from the weights of {}", init.display());
    }
    if trainer.loss_masks {
        ondol_core::say!(
            "data: loss masks lie beside the training shards: the loss counts only the targets they learn (the \
             completions, or the assistant's turns)"
        );
    }
    let mut writer = Writer::new(&run_dir, keep_last, resumed.unwrap_or(0))?;
    if let Some(step) = resumed
        && !writer.abandoned().is_empty()
    {
        let steps: Vec<String> = writer.abandoned().iter().rev().map(u64::to_string).collect();
        ondol_core::say!(
            "note: {} {} in {} {} past step {step}, where this run resumes: each is replaced or removed when the \
             run writes a checkpoint at or past its step",
            if steps.len() == 1 { "the checkpoint of step" } else { "the checkpoints of steps" },
            steps.join(", "),
            checkpoint::checkpoints_dir(&run_dir).display(),
            if steps.len() == 1 { "continues" } else { "continue" }
        );
    }
    let mut metrics = Metrics::create(&run_dir, steps, peak.flops, resumed)?;
    if let Some(step) = resumed {
        metrics.note(format!("resumed at step {step}"));
    }
    let summary = trainer::run(&mut trainer, &mut metrics, Some(&mut writer))?;
    metrics.finish();
    let val = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    let val_losses = match summary.first_val_loss {
        None => "val loss n/a".to_string(),
        // (A run stopped on request before its next evaluation.)
        Some(first) if summary.final_val_step == summary.first_step && summary.steps > summary.first_step => {
            format!("val loss {first:.4} at step {}, none since", summary.first_step)
        }
        Some(first) => format!("val loss {first:.4} -> {}", val(summary.final_val_loss)),
    };
    if let Some((used, total)) = trainer.engine.be.device_memory() {
        // What the driver reports includes its pool's reserve, the CUDA context and cuBLASLt.
        ondol_core::say!(
            "device memory: {:.2} GiB in use of {:.2} GiB; weights, optimizer and activations estimated at {:.2} GiB",
            used as f64 / 2f64.powi(30),
            total as f64 / 2f64.powi(30),
            trainer.memory_bytes() as f64 / 2f64.powi(30)
        );
    }
    let steps = match summary.first_step {
        0 => format!("{} step{}", summary.steps, if summary.steps == 1 { "" } else { "s" }),
        from => {
            let ran = summary.steps - from;
            format!("{ran} step{} (step {from} -> {})", if ran == 1 { "" } else { "s" }, summary.steps)
        }
    };
    let mfu = summary.flops_per_s / peak.flops;
    ondol_core::say!(
        "{}: {steps} in {:.1} s, {:.0} tokens/s training ({:.1} % MFU); train loss {:.4} -> {:.4}; {val_losses}",
        if summary.stopped_by.is_some() { "stopped" } else { "done" },
        summary.seconds,
        summary.tokens_per_s,
        100.0 * mfu,
        summary.first_loss,
        summary.final_loss,
    );
    if summary.stopped_by.is_some() {
        ondol_core::say!(
            "the run stopped on request before step {} = training.steps: `--resume auto` goes on from its checkpoint",
            trainer.cfg.training.steps
        );
    }
    Ok(RunEnd::of(&summary))
}

/// Refuses to start, without `--resume`, in a run directory that holds checkpoints: the run,
/// from step 0 or from a stage's `checkpoint.resume_from`, would overwrite them and their
/// metrics. `--resume auto` goes on from them.
fn refuse_a_run_over_another(args: &TrainArgs, cfg: &RunConfig) -> Result<()> {
    let run_dir = args.run_dir();
    let Some(newest) = checkpoint::list(&run_dir).into_iter().next().filter(|_| args.resume.is_none()) else {
        return Ok(());
    };
    let what = format!(
        "{} already holds a run (its newest checkpoint: {}): pass --resume auto to go on from it, or give this \
         run another --run-dir (or remove that one)",
        run_dir.display(),
        newest.display()
    );
    Err(match cfg.checkpoint.resume_from {
        Some(_) => Error::config("checkpoint.resume_from", format!("the stage would start over: {what}")),
        None => Error::Input(what),
    })
}

/// Restores `trainer` from the checkpoint `spec` names, or from `checkpoint.resume_from`
/// without one; returns the step it resumes at (None: step 0). `auto` takes the checkpoint
/// `latest` names, else the newest intact one of `run_dir` up to its step (later ones are of
/// a continuation abandoned by an earlier resume: they come last), warning about damaged ones
/// it skips, and without any starts as a run without `--resume` does. (A run without `--resume`
/// that has checkpoints of its own was refused before: [`refuse_a_run_over_another`].)
fn resume<B: Backend>(trainer: &mut Trainer<B>, run_dir: &Path, spec: Option<&str>) -> Result<Option<u64>> {
    let load = |trainer: &Trainer<B>, dir: &Path| checkpoint::load(dir, &trainer.model().cfg, &trainer.model().layout);
    let resume_from = trainer.cfg.checkpoint.resume_from.clone();
    let leader = trainer.is_leader();
    let ckpts = checkpoint::checkpoints_dir(run_dir);
    let newest = checkpoint::list_steps(run_dir);
    match spec {
        Some("auto") => {}
        Some("") => return Err(Error::config("--resume", "empty: give `auto` or a checkpoint directory")),
        // (A run directory, or its checkpoints/latest, stands for the checkpoint `latest` names.)
        Some(given) => {
            let dir = pretrained::model_dir(Path::new(given))?;
            if leader && dir != Path::new(given) {
                ondol_core::say!("--resume {given}: the checkpoint {}", dir.display());
            }
            return restore(trainer, load(trainer, &dir)?).map(Some);
        }
        // A run directory that holds checkpoints was refused before the ranks started.
        None if resume_from.is_none() => return Ok(None),
        None => {}
    }
    // `latest` names what the run wrote last: after a resume from an earlier checkpoint, the
    // later ones belong to the abandoned continuation.
    let latest = checkpoint::latest(run_dir);
    if let (Some(name), true, false) = (checkpoint::dangling_latest(run_dir), leader, newest.is_empty()) {
        ondol_core::say!(
            "note: {} names {name:?}, which is not a checkpoint here: going on from the newest",
            ckpts.join("latest").display()
        );
    }
    if let (Some(latest), Some((_, newer))) = (&latest, newest.first())
        && latest != newer
        && leader
    {
        ondol_core::say!(
            "note: {} names {}, the checkpoint the run wrote last, though {} is of a later step: going on from \
                 the one `latest` names (--resume DIR chooses another)",
            ckpts.join("latest").display(),
            latest.display(),
            newer.display()
        );
    }
    // Should the one `latest` names be damaged, the run's earlier ones come before the
    // abandoned continuation's later ones.
    let latest_step = newest.iter().find(|(_, d)| Some(d) == latest.as_ref()).map(|(step, _)| *step);
    let (earlier, later): (Vec<_>, Vec<_>) = newest
        .into_iter()
        .filter(|(_, d)| Some(d) != latest.as_ref())
        .partition(|(step, _)| latest_step.is_none_or(|l| *step <= l));
    let mut own: Vec<PathBuf> = latest.iter().cloned().collect();
    own.extend(earlier.into_iter().chain(later).map(|(_, d)| d));
    match (own.is_empty(), resume_from) {
        (true, None) => {
            // Where another rank's node finds one, every rank refuses.
            trainer.check_every_rank_loaded(None)?;
            if leader {
                ondol_core::say!("no checkpoint in {}: starting from step 0", ckpts.display());
            }
            Ok(None)
        }
        (true, Some(start)) => {
            if leader {
                ondol_core::say!(
                    "no checkpoint in {}: starting from {start} (checkpoint.resume_from)",
                    ckpts.display()
                );
            }
            let loaded = load(trainer, Path::new(&start)).map_err(|e| {
                let what = format!("cannot start from {start} (a checkpoints/step-XXXXXXXX directory): {e}");
                Error::config("checkpoint.resume_from", what)
            })?;
            restore(trainer, loaded).map(Some)
        }
        (false, _) => {
            for dir in &own {
                match load(trainer, dir) {
                    Ok(loaded) => return restore(trainer, loaded).map(Some),
                    Err(e) if leader => ondol_core::say!("warning: skipping checkpoint {}: {e}", dir.display()),
                    Err(_) => {}
                }
            }
            // Weights alone (a checkpoint saved without AdamW's state, or one whose state is
            // damaged) still start a run.
            let weights = own.iter().find(|dir| checkpoint::verify_weights(dir).is_ok());
            Err(Error::Input(format!(
                "no checkpoint in {} can be resumed (each is named above, with why); {}",
                ckpts.display(),
                match weights {
                    Some(dir) => format!(
                        "the newest whose weights are intact is {}: start a new run from them with \
                         --set 'model.init_from=\"{}\"' and another --run-dir",
                        dir.display(),
                        dir.display()
                    ),
                    None => "none holds intact weights either".to_string(),
                }
            )))
        }
    }
}

/// Restores `trainer` from `loaded`, saying so where the data starts over; returns the step.
fn restore<B: Backend>(trainer: &mut Trainer<B>, loaded: Loaded) -> Result<u64> {
    let (step, dir) = (loaded.state.step, loaded.dir.clone());
    if trainer.restore(loaded)? == DataPosition::Restarted && trainer.is_leader() {
        ondol_core::say!(
            "the data position of {} does not carry over to this run's data: reading it from its start \
             (checkpoint.on_data_change = \"restart\")",
            dir.display()
        );
    }
    Ok(step)
}

/// What `inspect` says of the attention, the norms and muP where a model has more than plain
/// Llama's: what an imported Qwen, EXAONE, HyperCLOVA X, Granite or Gemma model was read as.
fn describe_llama_relatives(m: &ModelConfig) -> Result<()> {
    if m.has_attention() {
        let extras: Vec<&str> = [(m.qkv_bias, "q, k and v biases"), (m.has_qk_norm(), "q and k norms")]
            .iter()
            .filter_map(|(has, what)| has.then_some(*what))
            .collect();
        let extras = if extras.is_empty() { String::new() } else { format!(", {}", extras.join(", ")) };
        answer!("attention            {} heads of {} ({} kv heads){extras}", m.n_heads, m.head_dim(), m.kv_heads());
        let layers: Vec<_> = (0..m.n_layers).map(|l| m.layer_attention(l)).collect();
        let (local, nope) =
            (layers.iter().filter(|l| l.window.is_some()).count(), layers.iter().filter(|l| !l.rope).count());
        if let Some(w) = m.sliding_window {
            answer!("sliding window       {w} keys on {local} of {} layers", m.n_layers);
        }
        if let Some(theta) = m.rope_theta_local {
            answer!("rotary theta         {} global, {theta} on windowed layers", m.rope_theta);
        }
        if let Some(s) = &m.rope_scaling {
            answer!("rope scaling         {}", s.describe());
        }
        if nope > 0 {
            answer!("without positions    {nope} of {} layers (NoPE)", m.n_layers);
        }
    }
    match m.norms() {
        BlockNorms::Pre => {}
        BlockNorms::Post => answer!("block norms          after the mixers"),
        BlockNorms::Both => answer!("block norms          before and after the mixers"),
    }
    if m.arch == Arch::Gemma3 {
        answer!(
            "gemma3               GeGLU, embedding scaled by sqrt(d_model), scores by 1/sqrt({})",
            m.query_pre_attn_scalar()
        );
    } else if !m.mup.is_default() {
        let u = &m.mup;
        let attention = u.attention_multiplier.map_or("1/sqrt(head_dim)".to_string(), |a| a.to_string());
        answer!(
            "muP multipliers      embedding {}, residual {}, logits {}, attention {attention}",
            u.embedding_multiplier,
            u.residual_multiplier,
            u.logits_multiplier
        );
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<()> {
    // A config file, or a checkpoint, run directory or checkpoints/latest (its pointer file).
    let pointer = args.config.is_file() && args.config.file_name().is_some_and(|n| n == "latest");
    let mut checkpoint_dir = None;
    let path = match args.config.is_dir() || pointer {
        false => args.config.clone(),
        true => {
            let dir = model_dir(&args.config)?;
            checkpoint_dir = Some(dir.clone());
            let toml = dir.join("ondol.toml");
            if !toml.is_file() {
                return Err(Error::Input(format!(
                    "{}: no ondol.toml to inspect (a Hugging Face directory has no run config; `ondol import hf` \
                     writes one)",
                    dir.display()
                )));
            }
            toml
        }
    };
    let cfg = match checkpoint_dir {
        Some(_) => RunConfig::load_written(&path, &args.set)?,
        None => RunConfig::load(&path, &args.set)?,
    };
    let model = Model::new(cfg.model.clone())?;
    let t = &cfg.training;
    let n = model.num_params() as u64;
    // Training's whole model on one rank holds a padded head (its logits are wider).
    let trained = Model::part(cfg.model.clone(), Part::whole(&cfg.model).with_vocab_align(HEAD_ROW_ALIGN))?;
    let configured = MicroBatch {
        recompute_every: t.activation_checkpointing,
        loss_chunk: t.loss_chunk_rows,
        ..MicroBatch::new(t.batch_size, t.seq_len)
    };
    let precision = t.compute_precision();
    let acts = |every| {
        let mb = MicroBatch { recompute_every: every, ..configured };
        (trained.activation_elems(mb) + scratch_elems(&[&trained], mb)).bytes(precision.bytes())
    };
    // A checkpoint's own state; with --verify, checked as a resume (or, of weights only, an
    // init_from) reads it (every byte: minutes for a large model, which is why it is asked for).
    let damage = match &checkpoint_dir {
        None => None,
        Some(dir) => {
            let resumable = dir.join("optimizer").is_dir();
            let checked = match (args.verify, resumable) {
                (false, _) => checkpoint::read_state(dir),
                (true, true) => checkpoint::verify(dir),
                (true, false) => checkpoint::verify_weights(dir),
            };
            match checked {
                Ok(state) => {
                    answer!(
                        "checkpoint           step {}, {} tokens trained on; {}; {}",
                        state.step,
                        state.tokens,
                        if resumable { "AdamW's state too (resumable)" } else { "weights only (model.init_from)" },
                        if args.verify { "every file's checksum matches" } else { "checksums not read (--verify)" }
                    );
                    None
                }
                Err(e) => {
                    answer!("checkpoint           DAMAGED: {e}");
                    Some(e)
                }
            }
        }
    };
    answer!("arch                 {:?}", cfg.model.arch);
    describe_llama_relatives(&cfg.model)?;
    answer!("parameters           {n} ({:.2}M)", n as f64 / 1e6);
    answer!("  in matmuls (N)     {} (non-embedding + output head)", model.num_flop_params());
    let (total, matmul) = (model.flops_per_token(t.seq_len), 6 * model.num_flop_params() as u64);
    answer!(
        "FLOPs/token          {total} at T = {}: 6N = {matmul} in matmuls, {} in attention scores and scans",
        t.seq_len,
        total - matmul
    );
    answer!("tokens/step          {}", cfg.global_batch() * t.seq_len);
    let p = &cfg.parallelism;
    let layout = cfg.layout(Mesh::new(p.tp, p.pp, p.dp)?);
    let worst = RankMemory::fullest(&cfg)?;
    answer!(
        "memory per rank      {} at most (pipeline stage {}) at (tp, pp, dp) = ({}, {}, {}), {}",
        bytes(worst.total()),
        worst.stage,
        p.tp,
        p.pp,
        p.dp,
        match precision {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16 weights and activations, fp32 gradients",
        }
    );
    answer!("  weights+grads      {}", bytes(worst.weights_grads));
    answer!(
        "  AdamW              {}{}{}",
        bytes(worst.adamw),
        if precision == Precision::Bf16 { " with fp32 master weights" } else { "" },
        if p.zero == 1 { " (ZeRO-1)" } else { "" }
    );
    answer!(
        "  activations        {} ({} of it scratch, held once): {} micro-batch{} in flight ({}){}",
        bytes(worst.activations),
        bytes(worst.scratch),
        worst.in_flight,
        if worst.in_flight == 1 { "" } else { "es" },
        schedule_name(layout.schedule),
        if p.sequence_parallel && p.tp > 1 { ", sequence parallel" } else { "" },
    );
    answer!(
        "whole model          {} activations for a micro-batch of {} x {}; {} recomputing every block, {} as configured",
        bytes(acts(0)),
        t.batch_size,
        t.seq_len,
        bytes(acts(1)),
        bytes(acts(t.activation_checkpointing))
    );
    // (After the config's figures, which hold whatever the damage.)
    damage.map_or(Ok(()), Err)
}

/// What `ondol inspect` counts on one rank, in the run's precision (as
/// `Engine::memory_bytes` counts the rank it runs).
#[derive(Default)]
struct RankMemory {
    stage: usize,
    /// The weights in the compute type and their f32 gradients.
    weights_grads: u64,
    /// The moments and, in mixed precision, the f32 master weights (each ZeRO-1's shard).
    adamw: u64,
    /// The micro-batches in flight over the rank's chunks, and the one scratch they share.
    activations: u64,
    scratch: u64,
    in_flight: usize,
}

impl RankMemory {
    /// The fullest rank of pipeline stage `pp`: its first tp shard (shards differ only in
    /// their vocabulary rows, of which the first holds the most), with all its chunks and the
    /// micro-batches its schedule keeps in flight.
    fn of_stage(cfg: &RunConfig, layout: &ondol_parallel::Layout, pp: usize) -> Result<Self> {
        let p = &cfg.parallelism;
        let coords = layout.mesh.coords(pp * p.tp)?;
        let parts: Vec<Model> = layout
            .parts(&cfg.model, coords)?
            .into_iter()
            .map(|part| Model::part(cfg.model.clone(), part))
            .collect::<Result<_>>()?;
        let peaks = schedule::in_flight(layout.schedule, pp, p.pp, layout.chunks, layout.micro);
        let models: Vec<&Model> = parts.iter().collect();
        let mb = layout.micro_batch();
        let precision = cfg.training.compute_precision();
        let width = precision.bytes();
        let scratch = scratch_elems(&models, mb).bytes(width);
        let mut rank = RankMemory { stage: pp, activations: scratch, scratch, ..RankMemory::default() };
        // Moments, and master weights where the weights are narrower than f32.
        let optimizer_bytes = 8 + if precision == Precision::Fp32 { 0 } else { 4 };
        for (m, in_flight) in parts.iter().zip(peaks) {
            let params = m.num_params() as u64;
            rank.weights_grads += (width as u64 + 4) * params;
            let held = if p.zero == 1 { params.div_ceil(p.dp as u64) } else { params };
            rank.adamw += optimizer_bytes * held;
            rank.activations += m.activation_elems(mb).times(in_flight as u64).bytes(width);
            rank.in_flight += in_flight;
        }
        Ok(rank)
    }

    fn total(&self) -> u64 {
        self.weights_grads.saturating_add(self.adamw).saturating_add(self.activations)
    }

    /// The fullest rank of the run's layout.
    fn fullest(cfg: &RunConfig) -> Result<Self> {
        let p = &cfg.parallelism;
        let layout = cfg.layout(Mesh::new(p.tp, p.pp, p.dp)?);
        let mut worst = RankMemory::default();
        for pp in 0..p.pp {
            let rank = RankMemory::of_stage(cfg, &layout, pp)?;
            if rank.total() > worst.total() {
                worst = rank;
            }
        }
        Ok(worst)
    }
}

/// Refuses a run whose ranks, all in this process, would need more memory than the machine
/// has (an estimate: [`RankMemory`]), before anything is allocated.
fn check_fits_in_memory(cfg: &RunConfig) -> Result<()> {
    let Some(machine) = physical_memory() else { return Ok(()) };
    let p = &cfg.parallelism;
    let layout = cfg.layout(Mesh::new(p.tp, p.pp, p.dp)?);
    let mut need = 0u64;
    for pp in 0..p.pp {
        need =
            need.saturating_add(RankMemory::of_stage(cfg, &layout, pp)?.total().saturating_mul((p.tp * p.dp) as u64));
    }
    if need > machine {
        return Err(Error::config(
            "training",
            format!(
                "this run needs about {} of memory (weights, gradients, AdamW and activations; `ondol inspect` \
                 itemizes them), but the machine has {}: lower training.batch_size or seq_len, turn on \
                 training.activation_checkpointing, or shrink [model]",
                bytes(need),
                bytes(machine)
            ),
        ));
    }
    Ok(())
}

/// The machine's physical memory (Linux's /proc/meminfo), if known.
fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

fn schedule_name(kind: ScheduleKind) -> &'static str {
    match kind {
        ScheduleKind::Gpipe => "gpipe",
        ScheduleKind::OneFOneB => "1f1b",
        ScheduleKind::Interleaved => "interleaved",
    }
}

/// `n` bytes in the largest binary unit that keeps the number at least 1.
fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < units.len() {
        x /= 1024.0;
        unit += 1;
    }
    format!("{x:.3} {}", units[unit])
}

/// The directory to evaluate and the data: `--data` takes every value after it, so a directory
/// given after the data arrives as its last value (a directory is never data).
fn eval_inputs(args: &EvalArgs) -> Result<(PathBuf, &[String])> {
    match (&args.dir, args.data.split_last()) {
        (Some(dir), _) => Ok((dir.clone(), &args.data)),
        (None, Some((last, data))) if !data.is_empty() && Path::new(last).is_dir() => Ok((last.into(), data)),
        (None, last) => {
            let missing = last.map(|(last, _)| last).filter(|last| !Path::new(last).exists());
            let why = missing.map_or(String::new(), |last| format!(" ({last}: no such file or directory)"));
            Err(Error::Input(format!(
                "eval needs a checkpoint, Hugging Face or run directory: `ondol eval DIR --data FILES...`{why}"
            )))
        }
    }
}

fn eval(args: EvalArgs) -> Result<()> {
    if args.batches == Some(0) {
        return Err(Error::config("--batches", "must be at least 1 (or left out for the whole data)"));
    }
    let (dir, data) = eval_inputs(&args)?;
    let p = load_model(&dir)?;
    let training = p.run_config.as_ref().map(|c| &c.training);
    let seq = args.seq_len.or(training.map(|t| t.seq_len)).unwrap_or(p.model.cfg.max_seq_len.min(1024));
    let batch = args.batch_size.or(training.map(|t| t.batch_size)).unwrap_or(8);
    let shape = MicroBatch { loss_chunk: training.map_or(0, |t| t.loss_chunk_rows), ..MicroBatch::new(batch, seq) };
    if seq == 0 || seq > p.model.cfg.max_seq_len || batch == 0 {
        return Err(Error::config(
            "--seq-len/--batch-size",
            format!("need 1 <= seq_len <= {} and batch_size >= 1", p.model.cfg.max_seq_len),
        ));
    }
    let files = ondol_data::expand_globs(data, Path::new("."))?;
    let shards = files.iter().all(|f| f.extension().is_some_and(|e| e == "bin"));
    let kind = if shards { SourceKind::Shards } else { SourceKind::ByteText };
    if !shards && !matches!(p.tokenizer()?, Tokenizer::Bytes(_)) {
        return Err(Error::Input(format!(
            "{} has a tokenizer.json: evaluate it on token shards (.bin), not text",
            dir.display()
        )));
    }
    // Shards of `data prepare` name their tokenizer: the model's must be it.
    let ours = p.dir.join("tokenizer.json");
    if shards {
        for (d, made) in ShardTokenizer::of_files(&files)? {
            if ours.is_file() && !made.is(&ours)? {
                return Err(Error::config(
                    "--data",
                    format!(
                        "the shards in {} were made with another tokenizer than {} ({} records it): their token ids \
                         would be read as other text",
                        d.display(),
                        ours.display(),
                        d.join("manifest.json").display()
                    ),
                ));
            }
        }
    }
    let stream = TokenStream::open(&files, kind)?;
    if stream.len() <= 1 {
        // (An empty text file reads as its end-of-text alone.)
        return Err(Error::config("--data", "holds no text to evaluate on (its files are empty)"));
    }
    if stream.len() <= batch * seq {
        return Err(Error::config(
            "--batch-size/--seq-len",
            format!(
                "the data holds {} tokens, fewer than one batch of {batch} x {seq} reads ({}): lower --batch-size \
                 or --seq-len",
                stream.len(),
                batch * seq + 1
            ),
        ));
    }
    let mut loader = Loader::new(Arc::new(stream), seq, batch, 1, Order::Sequential, 0, 1)?;
    let batches = args.batches.unwrap_or(usize::MAX).min(loader.batches_per_epoch() as usize);
    let documents = match args.mask_documents.unwrap_or(training.is_some_and(|t| t.mask_documents)) {
        true => {
            p.model.cfg.check_mask_documents("--mask-documents")?;
            Some(p.tokenizer()?.eot_id())
        }
        false => None,
    };
    let (loss, tokens) = match args.device {
        Device::Cpu => eval_on(&CpuBackend::new(), &p.params, &p.model, shape, documents, &mut loader, batches)?,
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let be = inference_gpu(&p.model)?;
                eval_on(&be, &be.upload(&p.params), &p.model, shape, documents, &mut loader, batches)?
            }
            #[cfg(not(feature = "cuda"))]
            return Err(no_cuda_backend("--device"));
        }
    };
    if args.json {
        answer!(
            "{}",
            serde_json::json!({ "loss": loss, "perplexity": loss.exp(), "tokens": tokens, "batches": batches })
        );
    } else {
        answer!(
            "loss {loss:.4}  perplexity {:.3}  over {tokens} target tokens ({batches} batch{} of {batch} x {seq})",
            loss.exp(),
            if batches == 1 { "" } else { "es" }
        );
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        return Err(Error::config(
            "--temperature",
            format!("{}: must be >= 0 (0 takes the most likely token)", args.temperature),
        ));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(Error::config("--top-p", format!("{}: must be in (0, 1]", args.top_p)));
    }
    let p = load_model(&args.dir)?;
    let tok = p.tokenizer()?;
    let sampling = Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    let eot = tok.eot_id();
    let (shown, prompt, stop) = match args.chat {
        true => {
            let (prompt, stop) = p.chat_prompt(&tok, &args.prompt)?;
            ("", prompt, stop)
        }
        // An empty prompt samples a text from its start: after an end-of-text, as a document
        // follows one in training (or after the BOS a tokenizer starts every text with).
        false => match tok.encode(&args.prompt)? {
            ids if ids.is_empty() => (args.prompt.as_str(), vec![eot], vec![eot]),
            ids => (args.prompt.as_str(), ids, vec![eot]),
        },
    };
    let room = p.model.cfg.max_seq_len.saturating_sub(prompt.len());
    if args.max_new_tokens > room && room > 0 {
        ondol_core::say!(
            "note: at most {room} new tokens: the prompt's {} and they fill the model's context of {}",
            prompt.len(),
            p.model.cfg.max_seq_len
        );
    }
    let show = |tokens: &mut dyn Iterator<Item = u32>| show_generated(shown, &prompt, &tok, tokens);
    match args.device {
        Device::Cpu => {
            let be = CpuBackend::new();
            show(&mut Generation::new(&be, &p, &p.params, &prompt, args.max_new_tokens, &stop, sampling)?)
        }
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let be = inference_gpu(&p.model)?;
                let params = be.upload(&p.params);
                show(&mut Generation::new(&be, &p, &params, &prompt, args.max_new_tokens, &stop, sampling)?)
            }
            #[cfg(not(feature = "cuda"))]
            return Err(no_cuda_backend("--device"));
        }
    }
}

/// Prints `prompt_text` and then each token's text as it is generated.
fn show_generated(
    prompt_text: &str,
    prompt: &[u32],
    tok: &Tokenizer,
    tokens: &mut dyn Iterator<Item = u32>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut text = TextStream::after(tok, prompt)?;
    let mut show = |piece: &str| {
        out.write_all(piece.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("cannot write to standard output", e))
    };
    show(prompt_text)?;
    for id in tokens {
        show(&text.push(id)?)?;
    }
    show("\n")?;
    if text.unfinished() > 0 {
        ondol_core::say!(
            "note: the last {} generated token(s) do not make a whole character and are not shown",
            text.unfinished()
        );
    }
    Ok(())
}

/// The model `path` names (see [`model_dir`]). Where it stands for a run's latest checkpoint
/// and that one is damaged, the error names the newest intact one.
fn load_model(path: &Path) -> Result<Pretrained> {
    let dir = model_dir(path)?;
    Pretrained::load(&dir).map_err(|e| {
        // (Only where the checkpoint's files are what fails: another would fail otherwise alike.)
        let damaged = checkpoint::verify_weights(&dir).is_err();
        let run = dir.parent().and_then(Path::parent).filter(|_| dir != path && damaged);
        let intact = run.and_then(|run| {
            checkpoint::list(run).into_iter().find(|c| *c != dir && checkpoint::verify_weights(c).is_ok())
        });
        match intact {
            Some(intact) => Error::Input(format!("{e}; the run's newest intact checkpoint is {}", intact.display())),
            None => e,
        }
    })
}

/// [`pretrained::model_dir`], saying which checkpoint a run or checkpoints directory stands for.
fn model_dir(path: &Path) -> Result<PathBuf> {
    let dir = pretrained::model_dir(path)?;
    if dir != path {
        ondol_core::say!("{}: the checkpoint {}", path.display(), dir.display());
    }
    Ok(dir)
}

/// The mean loss and the tokens of `batches` batches of `loader` on `be`, the loss making
/// `loss_chunk` rows of logits at a time (0: the default, as in training).
fn eval_on<B: Backend>(
    be: &B,
    params: &B::Buf,
    model: &Model,
    shape: MicroBatch,
    documents: Option<u32>,
    loader: &mut Loader,
    batches: usize,
) -> Result<(f64, u64)> {
    let mut ws = Workspace::with_options(be, model, shape)?;
    trainer::evaluate(be, model, params, &mut ws, documents, loader, batches)
}

fn import_hf(src: &Path, out: &Path) -> Result<()> {
    for warning in pretrained::import_hf(src, out)? {
        ondol_core::say!("warning: {warning}");
    }
    ondol_core::say!(
        "wrote {}: a checkpoint (step 0) and a starter run config, {}/ondol.toml, whose [model] \
         continues from it; fine-tune with `ondol train` on a copy of that file",
        out.display(),
        out.display()
    );
    Ok(())
}
