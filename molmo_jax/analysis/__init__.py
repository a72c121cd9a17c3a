"""Compile analysis: analytic model FLOPs (`flops`), statistics of compiled HLO (`hlo_stats`) and
ahead-of-time compilation of the training step for TPU slices (`aot`). Used by `tools.aot`,
`bench/` and the trainer's MFU figure; the model never imports it."""
