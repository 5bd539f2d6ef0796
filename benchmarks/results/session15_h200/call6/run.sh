#!/bin/bash
# Session 15, call 6 (the tree at b361da8): two split programs per SM. .variant counts 2 x the SM count as resident
# (4-warp programs: at most 128 threads x 255 registers, half an SM's register file), so that Mamba and RG-LRU at
# B=32 can run over 8 programs per row (256 programs) and Mamba at B=16 over 16. Each case in its own process with a
# short time limit (a program that cannot be resident would leave its row waiting).
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
V="cd .variant && env PYTHONPATH=\$PWD:\$OLDPWD"
run() { (cd .variant && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation --no-loop --no-xla --repeats 10 --warmup 2 "$@" > $R/$TAG.txt 2>&1; echo "$TAG rc=$?" >> $R/rc.txt); }
TAG=mamba_b32_p8 run --models Mamba --batches 32 --split-programs 8 --out $R/mamba_b32_p8.json
TAG=rglru_b32_p8 run --models RGLRU --batches 32 --split-programs 8 --out $R/rglru_b32_p8.json
TAG=mamba_b16_p16 run --models Mamba --batches 16 --split-programs 16 --out $R/mamba_b16_p16.json
TAG=control run --models Mamba,RGLRU --batches 32 16 --out $R/control.json
TAG=mamba_b32_p8_rep2 run --models Mamba --batches 32 --split-programs 8 --out $R/mamba_b32_p8_rep2.json
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
