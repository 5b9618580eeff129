//! `ondol comm-selftest`: a launched job's rendezvous checked end to end, without a model. Rank 0
//! serves the store and publishes a payload; every rank reads it, passes a barrier, and sums a
//! small vector across ranks through the store (in rank order, as [`crate::ThreadComm`] does).
//! Use it to bring up a cluster (`srun ondol comm-selftest`) and to test the launcher: a chosen
//! rank can be made to fail or to hang.

use crate::env::DistEnv;
use crate::error::CommError;
use crate::store::rendezvous;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct SelftestOptions {
    /// This rank exits with an error right after connecting.
    pub fail_rank: Option<usize>,
    /// This rank sleeps forever right after connecting (until a signal stops it).
    pub hang_rank: Option<usize>,
    /// Timeout of every store operation.
    pub timeout: Duration,
}

/// Runs the self-test as the rank `env` describes; prints one line per stage on stdout.
pub fn selftest(env: &DistEnv, opts: &SelftestOptions) -> Result<(), CommError> {
    let (rank, world) = (env.rank, env.world_size);
    let (server, mut store) = rendezvous(env, opts.timeout)?;
    println!("connected to the store at {} as rank {rank} of {world}", env.store_addr());
    if opts.hang_rank == Some(rank) {
        println!("hanging as asked (--hang-rank {rank})");
        store.set("selftest/hanging", b"")?;
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if opts.fail_rank == Some(rank) {
        // Fail only once the hanging rank has said so, so that a test sees both lines.
        if opts.hang_rank.is_some_and(|h| h != rank) {
            store.wait(&["selftest/hanging"])?;
        }
        return Err(CommError::Launch(format!("rank {rank} fails as asked (--fail-rank {rank})")));
    }

    if rank == 0 {
        store.set("selftest/payload", format!("hello from rank 0 of {world}").as_bytes())?;
    }
    let payload = store.get("selftest/payload")?;
    println!("payload: {}", String::from_utf8_lossy(&payload));
    store.barrier("selftest", world)?;
    println!("barrier passed");

    // Rank r contributes [r + 1, 2 (r + 1)]; the sum is [W (W + 1) / 2, W (W + 1)].
    let mine: Vec<f32> = vec![(rank + 1) as f32, 2.0 * (rank + 1) as f32];
    store.set(&format!("selftest/x/{rank}"), &mine.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    let mut sum = [0f32; 2];
    for r in 0..world {
        let bytes = store.get(&format!("selftest/x/{r}"))?;
        let parts: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if parts.len() != 2 {
            return Err(CommError::store(env.store_addr(), format!("rank {r} published {} bytes, not 8", bytes.len())));
        }
        sum[0] += parts[0];
        sum[1] += parts[1];
    }
    let t = (world * (world + 1) / 2) as f32;
    if sum != [t, 2.0 * t] {
        return Err(CommError::store(
            env.store_addr(),
            format!("all-reduce gave {sum:?}, expected {:?}", [t, 2.0 * t]),
        ));
    }
    println!("all-reduce through the store: {sum:?} ok");
    store.barrier("selftest-end", world)?;
    drop(store);
    if let Some(server) = server {
        server.shutdown(opts.timeout);
    }
    Ok(())
}
