"""Ahead-of-time compilation reports (molmo_jax.analysis.aot, tools.aot) on simulated CPU devices: exact
per-device parameter bytes for FSDP and tensor parallelism, a program over its memory budget is
reported as not fitting, HLO statistics count loop bodies once per trip. Compiles for TPU slices
run only where libtpu is installed (it is optional: the `tpu` extra)."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import tiny_sft
from molmo_jax.analysis import aot, hlo_stats, search, table, topology
from molmo_jax import models as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The rules table (molmo_jax.sharding.RULES) restated: which logical parameter axes each mesh axis splits.
FSDP_AXES = {"embed", "vit_embed", "vit_feature"}
TENSOR_AXES = {"vocab", "heads", "kv_heads", "mlp", "expert_mlp", "q_norm", "kv_norm", "vit_heads", "vit_mlp"}


def small_config():
    c = tiny_sft.get_config()
    c.batch_size, c.seq_len = 8, 64
    c.data.max_crops = 1  # 2 crops per example: a small, fast program
    return c


def expected_param_bytes(cfg, mesh: dict) -> int:
    """Bytes of one device's parameter shards from the shapes and logical names alone: a dimension
    is split over its mesh axis if the axis is > 1, not used by an earlier dimension and divides it."""
    state = nnx.state(model_lib.abstract_model(cfg.model), nnx.Param)
    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        split, used = 1, set()
        for size, name in zip(var.shape, names):
            axis = "fsdp" if name in FSDP_AXES else "tensor" if name in TENSOR_AXES else None
            n = mesh.get(axis, 1)
            if axis and n > 1 and axis not in used and size % n == 0:
                split *= n
                used.add(axis)
        total += math.prod(var.shape) * jnp.dtype(var.dtype).itemsize // split
    return total


@pytest.fixture(scope="module")
def reports():
    """The FSDP report is compiled; the tensor-parallel one stops after the state sizes (compiling
    it too would double this file's run time and test nothing more about parameter bytes)."""
    topo = topology.parse_topology("cpu-8")
    return {"fsdp": (dict(fsdp=8), aot.compile_report(small_config(), topo, dict(fsdp=8))),
            "tensor": (dict(fsdp=2, tensor=4), aot.compile_report(small_config(), topo, dict(fsdp=2, tensor=4),
                                                                   compile=False))}


@pytest.mark.parametrize("kind", ["fsdp", "tensor"])
def test_parameter_bytes_per_device_are_exact(reports, kind):
    mesh, r = reports[kind]
    cfg = small_config()
    full = expected_param_bytes(cfg, {})
    expected = expected_param_bytes(cfg, mesh)
    assert r["param_bytes_per_device"] == expected
    assert full // 8 < expected < full // 2  # mostly split; norms, biases and odd sizes replicate
    assert r["param_count"] * 4 == full
    assert r["grad_bytes_per_device"] == expected  # float32 parameters: the accumulator matches
    assert r["mesh"] == dict(dict(data=1, fsdp=1, tensor=1, expert=1), **mesh)


def test_report_memory_flops_and_collectives(reports):
    _, r = reports["fsdp"]
    assert r["fits"] and r["oom_message"] is None
    fixed = r["param_bytes_per_device"] + r["opt_state_bytes_per_device"] + r["batch_bytes_per_device"]
    assert r["peak_bytes_per_device"] >= fixed
    assert r["peak_bytes_per_device"] == (r["argument_bytes_per_device"] + r["output_bytes_per_device"]
                                          + r["temp_bytes_per_device"] + r["code_bytes_per_device"])
    # The HLO count (dots x loop trips) is near the analytic model FLOPs; XLA's own count sees
    # each scanned layer once and falls short.
    assert 0.8 < r["flops_per_device"] / r["model_flops_per_device"] < 1.5
    assert r["xla_cost_flops_per_device"] < r["flops_per_device"]
    assert r["unknown_trip_counts"] == 0
    assert r["collectives"]["all-reduce"]["count"] >= 1 and r["ici_bytes_per_device"] > 0
    assert r["roofline"] == {}  # no published roofline for simulated CPU devices


def test_oversized_program_is_reported_as_not_fitting(reports, tmp_path):
    """The same program as the FSDP report against a 4 MB budget, through the command line."""
    _, r = reports["fsdp"]
    budget_gib = 4e6 / 2 ** 30
    assert r["peak_bytes_per_device"] > 4e6
    out = subprocess.run(
        [sys.executable, "-m", "tools.aot", "--config", "configs/tiny_sft.py", "--topology", "cpu-8",
         "--mesh", "fsdp=8", "--config.batch_size=8", "--config.seq_len=64", "--config.data.max_crops=1",
         "--json", f"--hbm_gib={budget_gib}", f"--hlo-out={tmp_path / 'step.hlo'}"], cwd=ROOT, capture_output=True,
        text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    j = json.loads(out.stdout.strip().splitlines()[-1])
    assert j["fits"] is False
    assert j["hbm_bytes_per_device"] == pytest.approx(4e6)
    assert j["peak_bytes_per_device"] == r["peak_bytes_per_device"]
    for key in ("peak_bytes_per_device", "flops_per_device", "model_flops_per_device", "compile_seconds", "mesh"):
        assert key in j
    # The estimate at the top level (none on simulated CPU devices: no chip to put a roofline on;
    # test_roofline_takes_the_slowest_of_compute_memory_and_ici covers the TPU case), and where the
    # HBM bytes go.
    assert (j["est_step_seconds"], j["est_mfu"], j["bound"]) == (None, None, None) and j["roofline"] == {}
    categories = j["hbm_bytes_by_category"]
    assert set(categories) == set(hlo_stats.HBM_CATEGORIES)
    assert sum(categories.values()) == pytest.approx(j["hbm_traffic_bytes_per_device"])
    assert categories["attention"] > 0 and categories["matmul"] > 0 and categories["optimizer"] > 0
    text = (tmp_path / "step.hlo").read_text()
    assert "ENTRY" in text and hlo_stats.analyse_hlo(text, 8).flops == j["flops_per_device"]


def test_sweep_command_ranks_what_fits(reports):
    """A one-point sweep (the FSDP report's program) through the command line."""
    out = subprocess.run(
        [sys.executable, "-m", "tools.aot", "--config", "configs/tiny_sft.py", "--topology", "cpu-8", "--sweep",
         "--tensor=1,3", "--micro=1,4", "--remat=none", "--config.batch_size=8", "--config.seq_len=64",
         "--config.data.max_crops=1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    # tensor 3 does not divide 8 devices and 4 examples per device need 32 > 8: one point is left
    assert len(rows) == 1 and rows[0]["fits"] and rows[0]["mesh"]["fsdp"] == 8
    assert rows[0]["peak_bytes_per_device"] == reports["fsdp"][1]["peak_bytes_per_device"]


def test_best_compiles_the_recorded_variant(reports, tmp_path):
    """`--best` compiles the variant docs/scaling.json records for the config and slice (here the FSDP
    report's program: same peak), and names what is recorded when nothing is for that slice."""
    v = dict(mesh=dict(fsdp=8), micro=1, remat="none", grad_accum_steps=1, grad_accum_dtype="float32")
    doc = dict(targets=[], cells=[dict(config="tiny_sft", fastest=dict(topology="cpu-8", fits=True, variant=v))])
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps(doc))
    args = [sys.executable, "-m", "tools.aot", "--config", "configs/tiny_sft.py", "--best", f"--scaling_json={path}",
            "--config.batch_size=8", "--config.seq_len=64", "--config.data.max_crops=1", "--json"]
    out = subprocess.run(args + ["--topology", "cpu-8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mesh"]["fsdp"] == 8 and r["remat"] == "none" and "--mesh=fsdp=8" in out.stderr
    assert r["peak_bytes_per_device"] == reports["fsdp"][1]["peak_bytes_per_device"]
    out = subprocess.run(args + ["--topology", "cpu-4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "records no fitting variant of tiny_sft on cpu-4; recorded: tiny_sft on cpu-8" \
        in out.stderr and "Traceback" not in out.stderr


def test_bad_topology_and_mesh_are_clear_errors():
    for name, words in (("v9-8", "unknown TPU"), ("v5p-7", "even"), ("v5e-512", "largest slice"),
                        ("v5p-24", "power of two"), ("tpu", "expected NAME-N")):
        with pytest.raises(ValueError, match=words):
            topology.parse_topology(name)
    out = subprocess.run([sys.executable, "-m", "tools.aot", "--config", "configs/tiny_sft.py", "--topology",
                          "cpu-8", "--mesh", "fsdp=3,tensor=2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "needs 6 devices, but 8 are available" in out.stderr


def test_topology_names():
    t = topology.parse_topology("v5p-128")
    assert (t.chip.name, t.chips_per_slice, t.shape, t.num_slices) == ("v5p", 64, (4, 4, 4), 1)
    assert topology.parse_topology("v5p-8").shape == (2, 2, 1)
    assert topology.parse_topology("v5p-256").shape == (4, 4, 8)
    assert topology.parse_topology("v4-16").shape == (2, 2, 2)
    assert topology.parse_topology("v5e-256").shape == (16, 16)
    assert topology.parse_topology("v5litepod-8").shape == (2, 4) and topology.parse_topology("v6e-16").shape == (4, 4)
    multi = topology.parse_topology("2xv5p-256")
    assert (multi.num_slices, multi.chips_per_slice, multi.n_devices) == (2, 128, 256)
    assert topology.parse_topology("cpu-4").n_devices == 4 and not topology.parse_topology("cpu-4").is_tpu


def test_hlo_flops_count_every_loop_trip():
    def f(x, w):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
    compiled = jax.jit(f).lower(jnp.ones((16, 32)), jnp.ones((5, 32, 32))).compile()
    stats = hlo_stats.analyse_hlo(compiled.as_text(), 1)
    assert stats.flops == 5 * 2 * 16 * 32 * 32 and stats.unknown_trip_counts == 0


def test_hlo_collectives_in_a_loop():
    devices = jax.devices()[:4]
    mesh = jax.sharding.Mesh(devices, ("d",))
    spec = jax.sharding.PartitionSpec("d")

    def f(x):
        body = lambda h, _: (jax.lax.psum(h, "d") * 0.5, None)  # noqa: E731
        return jax.lax.scan(body, x, None, length=3)[0]
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    stats = hlo_stats.analyse_hlo(g.lower(jnp.ones((4, 256))).compile().as_text(), 4)
    ar = stats.collectives["all-reduce"]
    assert ar["count"] == 3 and ar["bytes"] == 3 * 256 * 4
    assert ar["link_bytes"] == pytest.approx(3 * 256 * 4 * 2 * 3 / 4)  # ring: 2 (n-1)/n of the buffer


def test_convolution_flops_count_only_real_kernel_taps():
    """A TPU batched matmul written as a convolution whose padded window covers one real input."""
    text = """HloModule m
ENTRY %main (p0: bf16[13,577,1024,1], p1: bf16[1024,16,64,1]) -> bf16[13,577,16,64] {
  %p0 = bf16[13,577,1024,1]{3,2,1,0} parameter(0)
  %p1 = bf16[1024,16,64,1]{3,2,1,0} parameter(1)
  ROOT %c = bf16[13,577,16,64]{3,2,1,0} convolution(%p0, %p1), window={size=1x16 pad=0_0x15_15 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f
}
"""
    assert hlo_stats.analyse_hlo(text, 1).flops == 2 * 13 * 577 * 16 * 64 * 1024


def test_grouped_matmul_kernel_flops():
    """TPU lowers lax.ragged_dot to a custom-call kernel: out [M, N] = lhs [M, K] x per-group [G, K, N]."""
    text = """HloModule m
ENTRY %main (a: bf16[18432,2048], b: bf16[64,2048,256], g: s32[65]) -> bf16[18432,256] {
  %a = bf16[18432,2048]{1,0} parameter(0)
  %b = bf16[64,2048,256]{2,1,0} parameter(1)
  %g = s32[65]{0} parameter(2)
  ROOT %ragged-dot-none = bf16[18432,256]{1,0} custom-call(%g, %a, %b), custom_call_target="tpu_custom_call"
}
"""
    assert hlo_stats.analyse_hlo(text, 1).flops == 2 * 18432 * 2048 * 256


def test_megablox_kernel_flops_are_its_estimate_times_the_local_experts():
    """The MoE's Pallas gmm / tgmm kernels carry their own cost estimate (2 m k n over all rows);
    a device holding 16 of 64 experts computes a quarter of the rows (balanced routing)."""
    def kernel(name, kind, out, rhs, flops):
        return (f'  ROOT %{name} = {out} custom-call(%o, %a, %b), custom_call_target="tpu_custom_call", '
                f'metadata={{op_name="jit(step)/shard_map/jit({kind})/pallas_call"}}, '
                f'backend_config={{"custom_call_config":{{"body":"x","cost_estimate":{{"flops":"{flops}",'
                f'"transcendentals":"0","bytes_accessed":"1"}}}}}}')
    flops = 2 * 4096 * 2048 * 128
    for experts, share in ((64, 1.0), (16, 0.25)):
        gmm = f"""HloModule m
ENTRY %main (o: s32[65], a: bf16[4096,2048], b: bf16[{experts},2048,128]) -> bf16[4096,128] {{
  %o = s32[65]{{0}} parameter(0)
  %a = bf16[4096,2048]{{1,0}} parameter(1)
  %b = bf16[{experts},2048,128]{{2,1,0}} parameter(2)
{kernel("gmm.3", "gmm", "bf16[4096,128]{1,0}", "", flops)}
}}
"""
        stats = hlo_stats.analyse_hlo(gmm, 1)
        assert stats.flops == flops * share
        assert stats.hbm_by_category["matmul"] == 2 * (4096 * 2048 + experts * 2048 * 128 + 4096 * 128) + 4 * 65
        tgmm = f"""HloModule m
ENTRY %main (o: s32[65], a: bf16[2048,4096], b: bf16[4096,128]) -> bf16[{experts},2048,128] {{
  %o = s32[65]{{0}} parameter(0)
  %a = bf16[2048,4096]{{1,0}} parameter(1)
  %b = bf16[4096,128]{{1,0}} parameter(2)
{kernel("tgmm", "tgmm", f"bf16[{experts},2048,128]{{2,1,0}}", "", flops)}
}}
"""
        assert hlo_stats.analyse_hlo(tgmm, 1).flops == flops * share


def test_attention_kernel_flops_and_bytes():
    """A splash attention kernel (TPU custom call; its metadata JSON spans lines): the analytic count
    over every query and key (forward 4 x queries x keys x head_dim), operands and results read and
    written once except the dynamic mask blocks (one row of 128-wide blocks), category attention."""
    text = """HloModule m
ENTRY %main (q: bf16[2,4,2,2304,128], k: bf16[2,4,2304,128], v: bf16[2,4,2304,128], m: s32[1,2304,2304]) -> bf16[2,4,2,2304,128] {
  %q = bf16[2,4,2,2304,128]{4,3,2,1,0} parameter(0)
  %k = bf16[2,4,2304,128]{3,2,1,0} parameter(1)
  %v = bf16[2,4,2304,128]{3,2,1,0} parameter(2)
  %m = s32[1,2304,2304]{2,1,0} parameter(3)
  ROOT %splash_mqa_fwd_no_residuals.3 = bf16[2,4,2,2304,128]{4,3,2,1,0} custom-call(%q, %k, %v, %m), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\"block_q\": 256}"
}}, metadata={op_name="jit(step)/pallas_call"}
}
"""
    stats = hlo_stats.analyse_hlo(text, 1)
    queries, keys, d = 2 * 4 * 2 * 2304, 2304, 128
    assert stats.flops == 4 * queries * keys * d
    qkvo = 2 * (2 * 4 * 2 * 2304 * 128) * 2 + 2 * (2 * 4 * 2304 * 128) * 2
    assert stats.hbm_bytes == qkvo + 4 * 2304 * 2304 * 128 / 2304
    assert stats.hbm_by_category["attention"] == stats.hbm_bytes


def test_attention_kernel_named_after_its_caller_is_counted():
    """Under remat and a batching loop XLA names the splash call after the enclosing function
    (`closed_call.N`); its op_name still ends in the splash function and the pallas call, which is
    what identifies the kernel and its kind (dq: 6 x queries x keys x head_dim)."""
    text = """HloModule m
ENTRY %main (q: bf16[7,2304,128], k: bf16[2304,128], v: bf16[2304,128], m: s32[81,256,256]) -> f32[7,2304,128] {
  %q = bf16[7,2304,128]{2,1,0} parameter(0)
  %k = bf16[2304,128]{1,0} parameter(1)
  %v = bf16[2304,128]{1,0} parameter(2)
  %m = s32[81,256,256]{2,1,0} parameter(3)
  ROOT %closed_call.827 = f32[7,2304,128]{2,1,0} custom-call(%q, %k, %v, %m), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 256}"
}}, metadata={op_name="jit(step)/while/body/closed_call/shard_map/vmap(dynamic_sparsity_splash)/jit(_splash_attention)/splash_mqa_dq/splash_mqa_dq/closed_call/while/body/closed_call/pallas_call" stack_frame_id=2}
}
"""
    stats = hlo_stats.analyse_hlo(text, 1)
    assert stats.flops == 6 * (7 * 2304) * 2304 * 128
    assert stats.hbm_by_category["attention"] == stats.hbm_bytes > 0
    # The same custom call without a splash op_name is not an attention kernel.
    plain = text.replace("splash_mqa_dq/splash_mqa_dq", "other_kernel")
    assert hlo_stats.analyse_hlo(plain, 1).flops == 0


def test_stacked_arrays_read_through_nested_fusions_count_the_slice():
    """A fusion that reads one layer of a stacked [layers, ...] array (saved activations under remat)
    through a nested fusion's dynamic-slice reads that layer, not the whole stack."""
    text = """HloModule m
%inner (p0: f32[28,4,8], p1: s32[]) -> f32[4,8] {
  %p0 = f32[28,4,8]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,4,8]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,4,8}
  ROOT %b = f32[4,8]{1,0} bitcast(%ds)
}
%outer (q0: f32[28,4,8], q1: s32[]) -> f32[4,8] {
  %q0 = f32[28,4,8]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %f = f32[4,8]{1,0} fusion(%q0, %q1), kind=kLoop, calls=%inner
  ROOT %n = f32[4,8]{1,0} negate(%f)
}
ENTRY %main (a: f32[28,4,8], i: s32[]) -> f32[4,8] {
  %a = f32[28,4,8]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %r = f32[4,8]{1,0} fusion(%a, %i), kind=kLoop, calls=%outer
}
"""
    layer = 4 * 8 * 4
    assert hlo_stats.analyse_hlo(text, 1).hbm_bytes == layer + layer + 4  # written, the slice read, the index


def test_async_slices_and_concat_bitcasts_move_only_the_slices():
    """TPU splits a gathered weight into async slices (`slice-start`, whose tuple shape names the whole
    operand) and joins them with a ConcatBitcast custom call, which moves nothing."""
    text = """HloModule m
ENTRY %main (a: bf16[4736,3584]) -> bf16[4736,3584] {
  %a = bf16[4736,3584]{1,0} parameter(0)
  %s0 = ((bf16[4736,3584]{1,0}), bf16[4736,1792]{1,0}, s32[]) slice-start(%a), slice={[0:4736], [0:1792]}
  %s1 = ((bf16[4736,3584]{1,0}), bf16[4736,1792]{1,0}, s32[]) slice-start(%a), slice={[0:4736], [1792:3584]}
  %d0 = bf16[4736,1792]{1,0} slice-done(%s0)
  %d1 = bf16[4736,1792]{1,0} slice-done(%s1)
  ROOT %c = bf16[4736,3584]{1,0} custom-call(%d0, %d1), custom_call_target="ConcatBitcast"
}
"""
    assert hlo_stats.analyse_hlo(text, 1).hbm_bytes == 2 * 2 * (4736 * 1792 * 2)


def test_sweep_grid_and_ranking():
    c = small_config()
    grid = aot.sweep_grid(c, 8, tensors=(1, 2, 4), micro=(1, 2), remats=("full",))
    seen = {(g.mesh.fsdp, g.mesh.tensor, g.grad_accum_steps) for g in grid}
    # 8 examples: fsdp 8 x 1 example -> accum 1; fsdp 8 x 2 examples needs 16 (left out); fsdp 4 x 2 -> 1
    assert seen == {(8, 1, 1), (4, 2, 2), (4, 2, 1), (2, 4, 4), (2, 4, 2)}
    assert all(g.model.remat == "full" for g in grid) and c.model.remat == "none"  # copies
    reports = [dict(fits=False, peak_bytes_per_device=1.0), dict(fits=True, roofline=dict(step_s=2.0)),
               dict(fits=True, roofline=dict(step_s=1.0)), dict(fits=False, peak_bytes_per_device=None)]
    ranked = aot.rank(reports)
    assert ranked[:3] == [reports[2], reports[1], reports[0]]


def test_roofline_takes_the_slowest_of_compute_memory_and_ici():
    chip = topology.CHIPS["v5p"]
    r = dict(flops_per_device=chip.peak_flops * 2.0, hbm_traffic_bytes_per_device=chip.hbm_bw * 1.0,
             ici_bytes_per_device=chip.ici_bw * 3.0, model_flops_per_device=chip.peak_flops * 1.5)
    roof = aot.roofline(r, chip)
    assert roof["bound"] == "ici" and roof["step_s"] == pytest.approx(3.0)
    assert roof["mfu"] == pytest.approx(0.5)
    assert aot.estimate_fields(dict(r, roofline=roof)) == dict(est_step_seconds=roof["step_s"], est_mfu=roof["mfu"],
                                                              bound="ici")


@pytest.fixture(scope="module")
def libtpu():
    return pytest.importorskip("libtpu", reason="libtpu is not installed: TPU topologies cannot be compiled for")


def test_tpu_slice_compile_and_out_of_memory(libtpu):
    """A tiny step compiles for a v5e-8 slice; one with a huge batch hits the compiler's
    RESOURCE_EXHAUSTED, which is reported, not raised."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: no TPU lock file needed
    topo = topology.parse_topology("v5e-8")
    devices = topology.topology_devices(topo)
    assert len(devices) == 8 and devices[0].platform == "tpu"
    dense = small_config()
    dense.model.attention = "dense"  # fused kernels compute on sequences padded to 128 (counted as such)
    r = aot.compile_report(dense, topo, dict(fsdp=8), devices=devices)
    assert r["fits"] and r["device_kind"] == "TPU v5 lite" and r["roofline"]["step_s"] > 0
    assert 0.8 < r["flops_per_device"] / r["model_flops_per_device"] < 1.5  # TPU dots are convolutions
    big = small_config()
    big.batch_size, big.seq_len = 1024, 2048
    big.model.attention = "dense"  # its [1024, 4, 2048, 2048] scores are what does not fit
    r = aot.compile_report(big, topo, dict(fsdp=8), devices=devices)
    assert not r["fits"] and "RESOURCE_EXHAUSTED" in r["oom_message"]
    assert r["compiler_hbm_bytes"] == pytest.approx(topology.CHIPS["v5e"].hbm_bytes, rel=0.01)
    assert r["peak_bytes_per_device"] > topology.CHIPS["v5e"].hbm_bytes


def test_tpu_moe_step_computes_only_routed_tokens(libtpu):
    """A MoE step compiled for v5e-8: through the grouped-matmul kernel ("auto" on TPU) it does about
    its model FLOPs (no remat here, so forward + backward = 3x forward); XLA's ragged dot lowers its
    weight gradient as every expert times every routed token (8 experts, top 2: ~4x that part)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topology.parse_topology("v5e-8")
    devices = topology.topology_devices(topo)
    ratio = {}
    for impl in ("auto", "ragged"):
        c = small_config()
        c.batch_size, c.seq_len = 16, 256
        c.model.attention, c.model.remat = "dense", "none"
        c.model.llm.update(moe_num_experts=8, moe_top_k=2, mlp_dim=256, d_model=256, n_heads=4,
                           head_dim=64, moe_impl=impl)
        r = aot.compile_report(c, topo, dict(fsdp=4, tensor=2), devices=devices)
        ratio[impl] = r["flops_per_device"] / r["model_flops_per_device"]
    assert 0.9 < ratio["auto"] < 1.1, ratio
    assert ratio["ragged"] > 1.5 * ratio["auto"], ratio
    # Split over tensor=4 each device holds 64 of an expert's 256 hidden columns, less than a TPU
    # block's 128 lanes: the kernel pads them (the lowering refused the step before), and the zero
    # columns are compiled work, so the ratio rises but stays under the ragged dot's.
    c.model.llm.moe_impl = "auto"
    r = aot.compile_report(c, topo, dict(fsdp=2, tensor=4), devices=devices)
    assert r["fits"] and not r.get("error"), r.get("error")
    assert ratio["auto"] < r["flops_per_device"] / r["model_flops_per_device"] < ratio["ragged"]


def _report(topology="v5p-64", mesh=None, micro=1, accum=1, remat="full", fits=True, step=9.5, mfu=0.41,
            model="molmo_72b"):
    mesh = mesh or dict(data=1, fsdp=2, tensor=16, expert=1)
    return dict(model=model, stage="sft", topology=topology, mesh=mesh, grad_accum_steps=accum, remat=remat,
                variant=dict(mesh={k: v for k, v in mesh.items() if v > 1}, micro=micro, remat=remat,
                             grad_accum_steps=accum, grad_accum_dtype="float32"),
                peak_bytes_per_device=60 * 2 ** 30, hbm_bytes_per_device=95 * 2 ** 30,
                roofline=dict(step_s=step, bound="compute", mfu=mfu), compile_seconds=600.0,
                compile_cpu_seconds=580.0, fits=fits)


def test_table_section_marks_cells_not_searched_yet():
    """An interrupted `tools.aot --table` writes a partial table and JSON: finished cells with their
    slice and variants, the others marked as pending, targets judged on what was found."""
    cfg = small_config()
    small, fast = _report(), _report(micro=4, remat="dots", mfu=0.58, step=6.7)
    cells = [dict(key="molmo_72b_sft", title="Molmo-72B", stage="sft", family="v5p", config=cfg, smallest=small,
                  fastest=fast),
             dict(key="molmo_7b_d_sft", title="Molmo-7B-D", stage="sft", family="v5e", config=cfg,
                  smallest=table.PENDING, fastest=table.PENDING)]
    targets = [dict(config="molmo_72b_sft", title="Molmo-72B", topology="v5p-64", target=0.55, lean=small,
                    fastest=fast),
               dict(config="molmo_7b_d_sft", title="Molmo-7B-D", topology="v5e-256", target=0.5, lean=table.PENDING,
                    fastest=table.PENDING)]
    text = table.generated_section(cells, targets, [small, fast], "2026-12-05")
    assert text.startswith(table.BEGIN) and text.rstrip().endswith(table.END)
    assert ("| Molmo-72B | sft | 8 x 64 | v5p-64 | fsdp=2 tensor=16, 1 ex/dev x 1, full | 60.00 / 95.00 | 41% | "
            "9.50 s (compute) | fsdp=2 tensor=16, 4 ex/dev x 1, dots | 60.00 / 95.00 | 58% | 6.70 s (compute) |") in text
    assert "| Molmo-72B | sft | v5p-64 | 55% | fsdp=2 tensor=16, 4 ex/dev x 1, dots |" in text and "| yes | 41% |" in text
    assert "| Molmo-7B-D | sft | v5e-256 | 50% | not searched yet |" in text
    assert "| Molmo-7B-D | sft |" in text and "not searched yet (v5e" in text
    assert "Molmo-72B stage 2 on v5p-512 or smaller: **met**" in text
    assert "Molmo-7B-D stage 2 on v5e-256 or smaller: **NOT met**: smallest fitting slice none" in text
    doc = json.loads(json.dumps(table.scaling_json(cells, targets, [small, fast], "2026-12-05"), default=float))
    assert doc["cells"][0]["fastest"]["variant"]["micro"] == 4 and doc["cells"][1]["searched"] is False
    assert doc["targets"][0]["fastest"]["flags"] == ["--mesh=fsdp=2,tensor=16", "--config.grad_accum_steps=1",
                                                     "--config.model.remat=dots", "--config.grad_accum_dtype=float32"]
    assert search.recorded_variant(doc, "molmo_72b_sft", "v5p-64")["remat"] == "dots"
    with pytest.raises(ValueError, match="records no fitting variant of molmo_7b_d_sft on v5e-256; recorded: "
                                         "molmo_72b_sft on v5p-64"):
        search.recorded_variant(doc, "molmo_7b_d_sft", "v5e-256")


def test_table_for_one_config_carries_the_others_over(tmp_path, monkeypatch):
    """`--table --only REGEX` on a host without the other configs' compiles keeps what the earlier
    table found for them (cells, targets, their rows of the compile list) instead of blanking them."""
    from configs import molmo_72b_sft, molmo_7b_d_sft
    small, fast = _report(), _report(micro=4, remat="dots", mfu=0.58, step=6.7)
    other = _report(topology="v5e-32", mesh=dict(fsdp=8, tensor=4), model="molmo_7b_d", mfu=0.6, step=8.1)
    cells = [dict(key="molmo_72b_sft", title="Molmo-72B", stage="sft", family="v5p", config=molmo_72b_sft.get_config(),
                  smallest=small, fastest=fast),
             dict(key="molmo_7b_d_sft", title="Molmo-7B-D", stage="sft", family="v5e",
                  config=molmo_7b_d_sft.get_config(), smallest=other, fastest=table.PENDING),
             dict(key="molmo_72b_sft", title="Molmo-72B", stage="sft", family="v5e", config=molmo_72b_sft.get_config(),
                  smallest=None, fastest=table.PENDING),  # no slice fits
             dict(key="molmo_7b_d_sft", title="Molmo-7B-D", stage="sft", family="v5p",
                  config=molmo_7b_d_sft.get_config(), smallest=table.PENDING, fastest=table.PENDING)]
    targets = [dict(config="molmo_72b_sft", title="Molmo-72B", topology="v5p-64", target=0.55, lean=small,
                    fastest=fast)]
    md, js = tmp_path / "scaling.md", tmp_path / "scaling.json"
    before = table.generated_section(cells, targets, [small, fast, other], "2026-12-05")
    md.write_text("# prose above\n\n" + before + "\n\nprose below\n")
    js.write_text(json.dumps(table.scaling_json(cells, targets, [small, fast, other], "2026-12-05"), default=float))
    monkeypatch.setattr(table, "MODELS", (("molmo_72b", "Molmo-72B"), ("molmo_7b_d", "Molmo-7B-D")))
    monkeypatch.setattr(table, "STAGES", {"molmo_72b": ("sft",), "molmo_7b_d": ("sft",)})
    monkeypatch.setattr(search, "SLICES", {k: search.SLICES[k] for k in ("v5p", "v5e")})
    monkeypatch.setattr(table, "TARGETS", (("molmo_72b_sft", "v5p-64", 0.55),))
    cells_wanted = {("molmo_72b_sft", "v5p"), ("molmo_7b_d_sft", "v5e"), ("molmo_72b_sft", "v5e")}
    # The one cell never searched would be looked up in the (empty) cache: keep it out of the way.
    monkeypatch.setattr(search, "smallest_fit", lambda *a: (_ for _ in ()).throw(search.NotCached()))
    table.write_table(str(md), str(js), str(tmp_path / "cache"), cached_only=True, log=lambda m: None,
                      only="^no_such_config$")
    text = md.read_text()
    assert text.startswith("# prose above") and text.rstrip().endswith("prose below")
    assert "carried over from the table generated on 2026-12-05" in text

    def rows(t):
        return [line for line in t.splitlines() if line.startswith("| Molmo") or line.startswith("| molmo")]
    assert sorted(rows(text)) == sorted(rows(before)) and len(rows(before)) == 8
    doc = json.loads(js.read_text())
    assert {(c["config"], c["family"]) for c in doc["cells"] if c["searched"]} == cells_wanted
    assert search.recorded_variant(doc, "molmo_72b_sft", "v5p-64")["remat"] == "dots"


_CACHE_SCRIPT = """
import os, sys
from configs import tiny_sft
from molmo_jax.analysis import search
cache = sys.argv[1]
cfg = tiny_sft.get_config()
cfg.update(batch_size=8, seq_len=64)
cfg.data.max_crops = 1
cfg.mesh.update(data=1, fsdp=8, tensor=1)
run = search.CachedCompiler(cache)
first = run(cfg, "cpu-8")
entries = sorted(os.listdir(cache))
renamed = cfg.copy_and_resolve_references()
renamed.log_every, renamed.data.data_dir = 7, "/elsewhere"  # the step program does not change
again = run(renamed, "cpu-8")
print(len(entries), sorted(os.listdir(cache)) == entries, again["compile_seconds"] == first["compile_seconds"],
      again["peak_bytes_per_device"] == first["peak_bytes_per_device"], again["flops_per_device"] == first["flops_per_device"])
other = cfg.copy_and_resolve_references()
other.model.remat = "dots"
try:
    search.CachedCompiler(cache, cached_only=True)(other, "cpu-8")
    print("cached")
except search.NotCached:
    print("not cached")
"""


def test_compile_cache_is_keyed_by_the_lowered_program(tmp_path):
    """tools.aot's cache: a config edit that leaves the training step unchanged reuses the compile
    (nothing new written, the same measurements); one that changes the step does not. (In a
    subprocess, for its own 8 simulated devices and a cold in-memory jit cache.)"""
    out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                          XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "True", "True", "True", "True", "not", "cached"]


class FakeCompiler:
    """Stands in for search.CachedCompiler: a report per variant from a table of
    (examples per device, remat, tensor) -> estimated step seconds (absent: does not fit)."""

    def __init__(self, steps, cached=None):
        self.steps, self.cached, self.calls = steps, cached, []

    def __call__(self, config, topology):
        v = search.describe(config)
        key = (v["micro"], v["remat"], v["mesh"].get("tensor", 1))
        self.calls.append(key)
        if self.cached is not None and key not in self.cached:
            raise search.NotCached(str(key))
        step = self.steps.get(key)
        return dict(_report(topology, dict(config.mesh), v["micro"], config.grad_accum_steps, v["remat"],
                            fits=step is not None, step=step or 0.0), variant=v)


def test_search_keeps_the_fastest_variant_that_fits():
    """tools.aot's search from a fitting lean variant: more examples per micro-batch while it helps,
    then other remat policies, then the neighbouring tensor splits, keeping only moves that fit and
    are faster; under cached_only a variant not compiled yet is skipped, not an error."""
    cfg = small_config()  # 8 examples, tiny model (4 heads): on 8 devices the lean split is tensor=4, fsdp=2
    lean_cfg = search.lean_variant(cfg, 8)
    assert search.describe(lean_cfg)["mesh"] == dict(fsdp=2, tensor=4)
    steps = {(1, "full", 4): 3.0, (2, "full", 4): 2.0, (4, "full", 4): 2.5, (2, "dots", 4): 1.5,
             (2, "dots", 2): 1.2, (1, "dots", 4): 1.9}
    start = FakeCompiler(steps)(lean_cfg, "v5p-16")
    run = FakeCompiler(steps)
    best, tried = search.fastest_variant(cfg, start, run, lambda m: None)
    assert (best["variant"]["micro"], best["remat"], best["mesh"]["tensor"]) == (2, "dots", 2)
    assert best["roofline"]["step_s"] == 1.2 and tried[0] is start
    assert (4, "dots", 2) not in run.calls  # 4 per device on 4 fsdp shards would need 16 examples
    assert len(run.calls) == len(set(run.calls))  # nothing compiled twice
    assert (8, "full", 4) not in run.calls  # 4 examples per device on 2 fsdp shards is the whole batch
    cached = FakeCompiler(steps, cached={(2, "full", 4)})
    best, _ = search.fastest_variant(cfg, start, cached, lambda m: None)
    assert (best["variant"]["micro"], best["remat"]) == (2, "full")


def test_moe_search_moves_the_mesh_first_and_tries_fsdp_alone():
    """A MoE's lean start (the largest tensor split) is its slowest variant: its search tries the mesh
    first, FSDP alone among the moves, and reaches it without walking every tensor halving."""
    cfg = small_config()
    cfg.model.llm.update(moe_num_experts=8, moe_top_k=2, mlp_dim=256, d_model=256, n_heads=8, head_dim=32)
    cfg.batch_size = 16
    lean_cfg = search.lean_variant(cfg, 16)
    assert search.describe(lean_cfg)["mesh"] == dict(tensor=8, fsdp=2)
    steps = {(1, "full", 8): 9.0, (1, "full", 4): 6.0, (1, "full", 1): 1.0}
    start = FakeCompiler(steps)(lean_cfg, "v5p-32")
    run = FakeCompiler(steps)
    best, _ = search.fastest_variant(cfg, start, run, lambda m: None)
    assert run.calls[0][2] != 8 and (1, "full", 1) in run.calls[:3]
    assert best["mesh"].get("tensor", 1) == 1 and best["roofline"]["step_s"] == 1.0
