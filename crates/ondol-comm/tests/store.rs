//! The rendezvous store over loopback TCP: clients on threads, blocking gets, barriers, counters,
//! timeouts that name what is missing, and clients that start before the server.

use ondol_comm::store::rendezvous;
use ondol_comm::{DistEnv, StoreClient, StoreServer};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

fn server() -> (StoreServer, String) {
    let s = StoreServer::bind("127.0.0.1:0").unwrap();
    let addr = s.addr().to_string();
    (s, addr)
}

#[test]
fn set_and_get_across_client_threads() {
    let (_server, addr) = server();
    let values: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                s.spawn(move || {
                    let mut c = StoreClient::connect(&addr, rank, TIMEOUT).unwrap();
                    c.set(&format!("k{rank}"), &[rank as u8; 3]).unwrap();
                    (0..3).flat_map(|r| c.get(&format!("k{r}")).unwrap()).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for v in values {
        assert_eq!(v, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
    }
}

#[test]
fn get_blocks_until_the_key_is_set() {
    let (_server, addr) = server();
    let mut setter = StoreClient::connect(&addr, 0, TIMEOUT).unwrap();
    let reader = std::thread::spawn({
        let addr = addr.clone();
        move || StoreClient::connect(&addr, 1, TIMEOUT).unwrap().get("late").unwrap()
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!reader.is_finished(), "get returned before the key was set");
    setter.set("late", b"value").unwrap();
    assert_eq!(reader.join().unwrap(), b"value");
}

#[test]
fn barrier_of_three_can_be_reused() {
    let (_server, addr) = server();
    std::thread::scope(|s| {
        for rank in 0..3 {
            let addr = addr.clone();
            s.spawn(move || {
                let mut c = StoreClient::connect(&addr, rank, TIMEOUT).unwrap();
                for round in 1..=3i64 {
                    c.add("arrived", 1).unwrap();
                    c.barrier("step", 3).unwrap();
                    // Everyone has counted this round before anyone leaves the barrier.
                    let seen = c.add("arrived", 0).unwrap();
                    assert!(seen >= 3 * round, "rank {rank} left barrier {round} after {seen} arrivals");
                    c.barrier("step-end", 3).unwrap();
                }
            });
        }
    });
}

#[test]
fn barrier_timeout_names_the_missing_rank() {
    let (_server, addr) = server();
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let addr = addr.clone();
                s.spawn(move || {
                    StoreClient::connect(&addr, rank, timeout).unwrap().barrier("init", 3).unwrap_err().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    for e in errors {
        assert!(e.contains("barrier `init` of 3 ranks timed out") && e.contains("rank(s) 2 did not arrive"), "{e}");
    }
}

#[test]
fn counters_wait_and_timeouts() {
    let (_server, addr) = server();
    let mut c = StoreClient::connect(&addr, 0, Duration::from_millis(200)).unwrap();
    assert_eq!(c.add("n", 2).unwrap(), 2);
    assert_eq!(c.add("n", -5).unwrap(), -3);
    assert_eq!(c.get("n").unwrap(), b"-3");
    c.set("text", b"abc").unwrap();
    assert!(c.add("text", 1).unwrap_err().to_string().contains("`text` is not a counter"));
    c.wait(&["n", "text"]).unwrap();
    let e = c.wait(&["n", "nope", "nada"]).unwrap_err().to_string();
    assert!(e.contains("timed out") && e.contains("nope, nada") && e.contains(&addr), "{e}");
    let e = c.get("missing").unwrap_err().to_string();
    assert!(e.contains("get `missing` timed out"), "{e}");
    // The connection stays usable after a timeout.
    assert_eq!(c.add("n", 3).unwrap(), 0);
}

#[test]
fn clients_wait_for_a_server_that_starts_later() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let client = std::thread::spawn({
        let addr = addr.clone();
        move || StoreClient::connect(&addr, 1, TIMEOUT).and_then(|mut c| c.get("hello"))
    });
    std::thread::sleep(Duration::from_millis(200));
    let server = StoreServer::bind(addr.as_str()).unwrap();
    StoreClient::connect(&addr, 0, TIMEOUT).unwrap().set("hello", b"world").unwrap();
    assert_eq!(client.join().unwrap().unwrap(), b"world");
    assert_eq!(server.shutdown(Duration::from_secs(5)), 0, "a client connection stayed open");
}

#[test]
fn an_absent_server_is_a_clear_error_after_the_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let e =
        StoreClient::connect(&format!("127.0.0.1:{port}"), 3, Duration::from_millis(300)).err().unwrap().to_string();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("is rank 0 running"), "{e}");
}

#[test]
fn a_malformed_request_only_costs_its_own_connection() {
    use std::io::{Read, Write};
    let (_server, addr) = server();
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.write_all(&[3, 0, 0, 0, 9, 9, 9]).unwrap();
    let mut reply = Vec::new();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut len = [0u8; 4];
    raw.read_exact(&mut len).unwrap();
    reply.resize(u32::from_le_bytes(len) as usize, 0);
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 2, "expected an error reply");
    let mut c = StoreClient::connect(&addr, 0, TIMEOUT).unwrap();
    c.set("ok", b"1").unwrap();
    assert_eq!(c.get("ok").unwrap(), b"1");
}

/// A rank of another job that finds this job's store on its port (two launches on one
/// MASTER_PORT) is refused, naming both job ids; this job's own ranks go on.
#[test]
fn a_rank_of_another_job_is_refused_by_the_store() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env = |rank: usize, job: &str| DistEnv {
        rank,
        world_size: 2,
        local_rank: rank,
        local_world_size: 2,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        job_id: job.into(),
    };
    let (server, mut first) = rendezvous(&env(0, "job-a"), TIMEOUT).unwrap();
    assert!(server.is_some());
    let err = rendezvous(&env(1, "job-b"), TIMEOUT).err().unwrap().to_string();
    assert!(err.contains("another job") && err.contains("job-a") && err.contains("job-b"), "{err}");
    let (none, mut second) = rendezvous(&env(1, "job-a"), TIMEOUT).unwrap();
    assert!(none.is_none());
    second.set("hello", b"from rank 1").unwrap();
    assert_eq!(first.get("hello").unwrap(), b"from rank 1");
}
