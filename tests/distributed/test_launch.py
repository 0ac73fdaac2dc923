"""Who runs which rank (`tp_plan`) and the environment's TP size, without starting anything."""

from __future__ import annotations

import pytest

from mistralrs.distributed.launch import TPPlan, tp_plan
from mistralrs.worker.options import ExecutionOptions

DEFAULT = ExecutionOptions()


def test_single_node_size_from_options_or_every_gpu():
    assert tp_plan(DEFAULT, {}, 0) is None
    assert tp_plan(DEFAULT, {}, 1) is None
    assert tp_plan(ExecutionOptions(tp_size=1), {}, 4) is None
    assert tp_plan(DEFAULT, {}, 4) == TPPlan(4, 0, 4, "nccl", "127.0.0.1", 0)
    assert tp_plan(ExecutionOptions(nccl=False), {}, 4) is None   # MISTRALRS_NO_NCCL: the device map applies
    assert tp_plan(ExecutionOptions(tp_size=3), {}, 0) == TPPlan(3, 0, 3, "gloo", "127.0.0.1", 0)
    assert tp_plan(ExecutionOptions(tp_size=2), {}, 4).backend == "nccl"
    assert tp_plan(ExecutionOptions(tp_size=2, nccl=False), {}, 4).backend == "gloo"
    with pytest.raises(ValueError, match="tp_size=8: only 4 CUDA GPU"):
        tp_plan(ExecutionOptions(tp_size=8), {}, 4)


def test_torchrun_variables_give_one_rank_per_process():
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    plan = tp_plan(DEFAULT, env, 1)
    assert plan == TPPlan(4, 2, 1, "nccl", "10.0.0.1", 29500, agent_store=True, local_rank=0)
    assert not plan.is_head and tp_plan(DEFAULT, {**env, "RANK": "0"}, 1).is_head
    assert tp_plan(DEFAULT, {**env, "WORLD_SIZE": "1"}, 0) is None
    with pytest.raises(ValueError, match="tp_size=2 .* disagrees with WORLD_SIZE=4"):
        tp_plan(ExecutionOptions(tp_size=2), env, 0)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        tp_plan(DEFAULT, {k: v for k, v in env.items() if k != "MASTER_ADDR"}, 0)
    with pytest.raises(ValueError, match="RANK='x'"):
        tp_plan(DEFAULT, {**env, "RANK": "x"}, 0)


def test_reference_multi_node_variables_map_onto_ranks():
    head = {"MISTRALRS_MN_GLOBAL_WORLD_SIZE": "4", "MISTRALRS_MN_HEAD_NUM_WORKERS": "1",
            "MISTRALRS_MN_HEAD_PORT": "5000"}
    assert tp_plan(DEFAULT, head, 2) == TPPlan(4, 0, 2, "nccl", "127.0.0.1", 5000)
    worker = {"MISTRALRS_MN_GLOBAL_WORLD_SIZE": "4", "MISTRALRS_MN_WORKER_ID": "0",
              "MISTRALRS_MN_WORKER_SERVER_ADDR": "head.local:5000"}
    plan = tp_plan(DEFAULT, worker, 2)
    assert plan == TPPlan(4, 2, 2, "nccl", "head.local", 5000)
    assert plan.for_child(1) == TPPlan(4, 3, 1, "nccl", "head.local", 5000, local_rank=1)
    cpu_worker = {**worker, "MISTRALRS_MN_GLOBAL_WORLD_SIZE": "2"}
    assert tp_plan(DEFAULT, cpu_worker, 0) == TPPlan(2, 1, 1, "gloo", "head.local", 5000)
    with pytest.raises(ValueError, match="is not 2 nodes x 2 ranks"):
        tp_plan(DEFAULT, {**head, "MISTRALRS_MN_GLOBAL_WORLD_SIZE": "6"}, 2)
    with pytest.raises(ValueError, match="MISTRALRS_MN_WORKER_ID=1: its ranks 4..5 lie outside"):
        tp_plan(DEFAULT, {**worker, "MISTRALRS_MN_WORKER_ID": "1"}, 2)
    with pytest.raises(ValueError, match="MISTRALRS_MN_WORKER_SERVER_ADDR='head'; accepted values: host:port"):
        tp_plan(DEFAULT, {**worker, "MISTRALRS_MN_WORKER_SERVER_ADDR": "head"}, 2)


def test_environment_sets_tp_size_and_nccl():
    assert ExecutionOptions.from_env(environ={"MISTRALRS_TP_SIZE": "2"}).tp_size == 2
    assert ExecutionOptions.from_env(environ={}).tp_size is None
    assert ExecutionOptions.from_env(environ={"MISTRALRS_NO_NCCL": "1"}).nccl is False
    assert ExecutionOptions.from_env(environ={"MISTRALRS_NO_NCCL": "0"}).nccl is True
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=f"MISTRALRS_TP_SIZE='{bad}'"):
            ExecutionOptions.from_env(environ={"MISTRALRS_TP_SIZE": bad})
    with pytest.raises(ValueError, match="tp_size must be an int >= 1"):
        ExecutionOptions(tp_size=0)


def test_environment_sets_the_collective_timeout():
    assert ExecutionOptions.from_env(environ={}).tp_timeout_s == 60.0
    assert ExecutionOptions.from_env(environ={"MISTRALRS_TP_TIMEOUT": " 2.5 "}).tp_timeout_s == 2.5
    for bad in ("0", "-3", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match=f"MISTRALRS_TP_TIMEOUT='{bad}'; accepted values: a positive number"):
            ExecutionOptions.from_env(environ={"MISTRALRS_TP_TIMEOUT": bad})
    for bad in (0, -1.0, True, "60"):
        with pytest.raises(ValueError, match="tp_timeout_s must be a positive number of seconds"):
            ExecutionOptions(tp_timeout_s=bad)
