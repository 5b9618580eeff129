//! DistEnv from explicit variable maps: torchrun names, Slurm names, precedence, node lists and
//! the errors a misconfigured job script produces.

use ondol_comm::DistEnv;
use ondol_comm::env::{expand_nodelist, first_host, parse_tasks_per_node};
use std::collections::HashMap;

fn parse(vars: &[(&str, &str)]) -> Result<DistEnv, String> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    DistEnv::from_lookup(&|k| map.get(k).cloned()).map_err(|e| e.to_string())
}

#[test]
fn nothing_set_is_a_single_rank() {
    let env = parse(&[]).unwrap();
    assert_eq!(
        env,
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            job_id: String::new(),
        }
    );
    assert_eq!(env.store_addr(), "127.0.0.1:29500");
}

#[test]
fn torchrun_variables() {
    let env = parse(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node01"),
        ("MASTER_PORT", "1234"),
    ])
    .unwrap();
    assert_eq!((env.rank, env.world_size, env.local_rank, env.local_world_size), (5, 8, 1, 4));
    assert_eq!(env.store_addr(), "node01:1234");
    let v6 = parse(&[("MASTER_ADDR", "::1"), ("MASTER_PORT", "7")]).unwrap();
    assert_eq!(v6.store_addr(), "[::1]:7");
}

#[test]
fn slurm_variables() {
    let env = parse(&[
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_TASKS_PER_NODE", "4(x2)"),
        ("SLURM_JOB_NODELIST", "gpu-[3-5]"),
        ("SLURM_JOB_ID", "123456"),
        ("SLURM_STEP_ID", "0"),
        ("SLURM_RESTART_COUNT", "2"),
    ])
    .unwrap();
    assert_eq!((env.rank, env.world_size, env.local_rank, env.local_world_size), (6, 8, 2, 4));
    assert_eq!(env.master_addr, "gpu-3");
    assert_eq!(env.master_port, 15000 + (123456 % 20000) as u16);
    assert_eq!(env.job_id, "123456.0.2");
    // Without per-node counts, ntasks / nnodes.
    let env = parse(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "6"), ("SLURM_NNODES", "3")]).unwrap();
    assert_eq!(env.local_world_size, 2);
    // --ntasks-per-node gives one number for every node.
    let env = parse(&[("SLURM_NTASKS", "8"), ("SLURM_NODEID", "1"), ("SLURM_NTASKS_PER_NODE", "4")]).unwrap();
    assert_eq!(env.local_world_size, 4);
}

#[test]
fn torchrun_names_take_precedence_over_slurm_per_variable() {
    let env = parse(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("SLURM_PROCID", "7"),
        ("SLURM_NTASKS", "16"),
        ("MASTER_PORT", "4000"),
        ("SLURM_JOB_ID", "99"),
        ("SLURM_JOB_NODELIST", "a1,b2"),
    ])
    .unwrap();
    assert_eq!((env.rank, env.world_size, env.master_port), (1, 2, 4000));
    assert_eq!(env.master_addr, "a1");
    let torchrun = parse(&[("TORCHELASTIC_RUN_ID", "run-7"), ("SLURM_JOB_ID", "99")]).unwrap();
    assert_eq!(torchrun.job_id, "run-7");
}

#[test]
fn node_lists_expand_like_slurm() {
    assert_eq!(expand_nodelist("node[01-04,07]").unwrap(), ["node01", "node02", "node03", "node04", "node07"]);
    assert_eq!(expand_nodelist("a1,b2").unwrap(), ["a1", "b2"]);
    assert_eq!(expand_nodelist("gpu-[3-5]").unwrap(), ["gpu-3", "gpu-4", "gpu-5"]);
    assert_eq!(expand_nodelist("x[1-2],y,z[09-10]").unwrap(), ["x1", "x2", "y", "z09", "z10"]);
    assert_eq!(expand_nodelist("r[1-2]-n[1-2]").unwrap(), ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]);
    assert_eq!(first_host("node[01-04,07]").unwrap(), "node01");
    for bad in ["node[01-04", "node]1[", "a,,b", "n[4-2]", "n[a-b]", "n[[1]]"] {
        assert!(expand_nodelist(bad).is_err(), "{bad} accepted");
    }
    assert_eq!(parse_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
    assert!(parse_tasks_per_node("2(x3").is_err());
}

#[test]
fn inconsistent_or_malformed_values_name_the_variable() {
    let e = parse(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err();
    assert!(e.contains("RANK: is 4, but WORLD_SIZE is 4; ranks run from 0 to 3"), "{e}");
    let e = parse(&[("SLURM_PROCID", "9"), ("SLURM_NTASKS", "2")]).unwrap_err();
    assert!(e.contains("SLURM_PROCID: is 9, but SLURM_NTASKS is 2"), "{e}");
    let e = parse(&[("RANK", "two"), ("WORLD_SIZE", "4")]).unwrap_err();
    assert!(e.contains("environment variable RANK: \"two\" is not a non-negative integer"), "{e}");
    let e = parse(&[("WORLD_SIZE", "0")]).unwrap_err();
    assert!(e.contains("WORLD_SIZE: is 0"), "{e}");
    let e = parse(&[("MASTER_PORT", "70000")]).unwrap_err();
    assert!(e.contains("MASTER_PORT: \"70000\" is not a port"), "{e}");
    let e = parse(&[("WORLD_SIZE", "4"), ("LOCAL_RANK", "2"), ("LOCAL_WORLD_SIZE", "2")]).unwrap_err();
    assert!(e.contains("LOCAL_RANK: is 2, but LOCAL_WORLD_SIZE is 2"), "{e}");
    let e = parse(&[("SLURM_NTASKS", "4"), ("SLURM_JOB_NODELIST", "n[1-")]).unwrap_err();
    assert!(e.contains("SLURM_JOB_NODELIST") && e.contains("unclosed bracket"), "{e}");
    let e = parse(&[("SLURM_NTASKS", "4"), ("SLURM_NODEID", "2"), ("SLURM_TASKS_PER_NODE", "2,2")]).unwrap_err();
    assert!(e.contains("SLURM_TASKS_PER_NODE") && e.contains("no entry for SLURM_NODEID 2"), "{e}");
}
