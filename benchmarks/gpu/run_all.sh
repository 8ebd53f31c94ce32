#!/usr/bin/env bash
# All remaining benchmarks on a lent GPU machine in one call, as one job queue in order of
# priority: transfer MAE / ImageNet arms and their ensembles (#12), continued pretraining
# (pretrain_benefit.py), BioTune searches and strategies (finetune_compare.py), the
# pretrained-defaults grid, then the CUDA test suite at low priority; everything stops at
# BUDGET_S and the run folders come back as tarballs in $OUT. Needs .gpu/ from make_bundle.sh;
# carry .gpu/whl .gpu/whl_db .gpu/whl_unused .gpu/data and run `bash benchmarks/gpu/run_all.sh`.
set -u
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
T0=$(date +%s); END=$(( T0 + ${BUDGET_S:-420} )); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl .gpu/whl_db/*.whl .gpu/whl_unused/*.whl > $OUT/pip.log 2>&1 || { tail $OUT/pip.log; exit 1; }
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=1
python3 -c "import torch,medtl.cli,medtl.data.corpus,sqlalchemy; print('torch',torch.__version__,torch.cuda.get_device_name(0))" || exit 1
el env ok
W=/tmp/w; G=$PWD/.gpu/data; M=$G/busi128.csv; mkdir -p $W/parts $W/logs $W/jobs
D="--data-root busi=$G/busi --data-root breastmnist=$G/medmnist"
DM="$D --manifest busi=$M"
# GPU step speed first, on an idle machine (no torch.compile: its first step costs minutes)
timeout 60 python3 benchmarks/cpu_speed.py --device cuda --data-root $G/busi --batch-size 128 --steps 5 --repeats 2 --threads 1 --out $W/parts/gpu_speed.md > $W/logs/gpu_speed.log 2>&1
el speed done
n=0; job() { n=$((n+1)); printf '%s\n' "$2 > $W/logs/$1.log 2>&1" > $W/jobs/$(printf %03d $n)-$1.sh; }
PB="python3 benchmarks/pretrain_benefit.py --work $W/pb $DM --corpus-root $G --set pretrain.num_workers=2"
TR="python3 benchmarks/transfer.py --work $W/transfer $D"
FC="python3 benchmarks/finetune_compare.py --work $W/ftc $DM --set search.generations=${GENS:-2} --set search.max_epochs=${MAXEP:-6}"
PD_CONFIGS=${PD_CONFIGS:-base backbone_lr_0.3 backbone_lr_0.1 layer_decay_0.75 warmup_0 warmup_3 smoothing_0.1 augment_none augment_medium}
PD="python3 benchmarks/pretrained_defaults.py --work $W/pd $DM"
# the queue, in order of priority: transfer (#12), continued pretraining (#14), BioTune searches
# and strategies (#15), then the pretrained-defaults grid (#12, validation only)
for s in 0 1 2; do for ds in busi breastmnist; do
  ex=""; [[ $ds == busi ]] && ex="--set data.manifest=$M"
  for a in mae_entropy mae_random; do
    job tr-$ds-$s-$a "$TR --datasets $ds --seeds $s --arms $a $ex --set pretrain.epochs=${TR_EP:-40} --out-results $W/parts/tr-$ds-$s-$a.md --out-compute $W/parts/trc-$ds-$s-$a.md"
  done
done; done
for s in 0 1 2; do for ds in busi breastmnist; do
  job pb-$ds-$s-corpus "$PB --datasets $ds --seeds $s --arms imagenet_mae_corpus --set pretrain.epochs=${CORPUS_EP:-2} --out-results $W/parts/pb-$ds-$s-corpus.md"
  for a in imagenet_mae_entropy imagenet_mae_random imagenet_mae_unit16; do
    job pb-$ds-$s-$a "$PB --datasets $ds --seeds $s --arms $a --set pretrain.epochs=${PB_EP:-30} --out-results $W/parts/pb-$ds-$s-$a.md"
  done
done; done
for ds in busi breastmnist; do for ss in 0 1; do for sch in reference halving; do
  job fc-$ds-$ss-$sch "$FC --datasets $ds --arms biotune_$sch --search-seeds $ss --out-results $W/parts/fc-$ds-$ss-$sch.md --out-compute $W/parts/fcc-$ds-$ss-$sch.md"
done; done; done
for s in 0 1 2; do for ds in busi breastmnist; do
  ex=""; [[ $ds == busi ]] && ex="--set data.manifest=$M"
  job tr-$ds-$s-lite0 "$TR --datasets $ds --seeds $s --arms imagenet_lite0 $ex --out-results $W/parts/tr-$ds-$s-lite0.md --out-compute $W/parts/trc-$ds-$s-lite0.md"
  job pb-$ds-$s-imagenet "$PB --datasets $ds --seeds $s --arms imagenet --out-results $W/parts/pb-$ds-$s-imagenet.md"
done; done
for s in 0 1 2; do for ds in busi breastmnist; do for a in full linear surgical_first surgical_last autorgn lora lpft; do
  job fc-$ds-$s-$a "$FC --datasets $ds --arms $a --seeds $s --out-results $W/parts/fc-$ds-$s-$a.md --out-compute $W/parts/fcc-$ds-$s-$a.md"
done; done; done
for s in ${PD_SEEDS:-0}; do for c in $PD_CONFIGS; do for ds in busi breastmnist; do
  job pd-$ds-$s-$c "$PD --datasets $ds --seeds $s --configs $c --out $W/parts/pd-$ds-$s-$c.md"
done; done; done
el "$n jobs queued"
( ls $W/jobs/*.sh | xargs -P ${P:-32} -n1 bash ) &
QUEUE=$!
( timeout $(( END - $(date +%s) - 20 )) nice -n 19 python3 -m pytest -q -n 2 -p no:cacheprovider tests --deselect tests/test_runs.py::test_a_second_writer_is_refused_naming_the_holder > $OUT/pytest.log 2>&1; echo "pytest rc $?" >> $OUT/pytest.log ) &
while kill -0 $QUEUE 2>/dev/null && [ $(date +%s) -lt $(( END - 75 )) ]; do sleep 5; done
pkill -f "[x]args -P"
el "wave 1 ended (queue alive: $(kill -0 $QUEUE 2>/dev/null && echo yes || echo no))"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
# wave 2: ensembles of whatever members finished (never retrains: members unfinished are skipped by the time limit)
for s in 0 1 2; do for ds in busi breastmnist; do
  ex=""; [[ $ds == busi ]] && ex="--set data.manifest=$M"
  [ -f $W/transfer/$ds/mae_entropy/seed$s/evaluate/evaluation.json ] && [ -f $W/transfer/$ds/imagenet_lite0/seed$s/evaluate/evaluation.json ] && \
    (timeout $(( END - $(date +%s) - 15 )) $TR --datasets $ds --seeds $s --arms mae_entropy imagenet_lite0 ensemble $ex --out-results $W/parts/tr-$ds-$s-ens.md --out-compute $W/parts/trc-$ds-$s-ens.md > $W/logs/tr-$ds-$s-ens.log 2>&1 &)
  (timeout $(( END - $(date +%s) - 15 )) $PB --datasets $ds --seeds $s --arms ensemble --out-results $W/parts/pb-$ds-$s-ens.md > $W/logs/pb-$ds-$s-ens.log 2>&1 &)
done; done
sleep 1
while [ $(date +%s) -lt $(( END - 12 )) ] && pgrep -f "arms.*ensemble" > /dev/null; do sleep 3; done
el "ensembles ended"
pkill -f "[b]enchmarks/" ; sleep 2; pkill -9 -f "[b]enchmarks/"
X="--exclude=*.safetensors --exclude=*.pt --exclude=*.pth --exclude=*.onnx --exclude=*.png --exclude=*.html --exclude=*ckpt* --exclude=*checkpoint*"
tar czf $OUT/transfer.tgz $X -C $W transfer; tar czf $OUT/pb.tgz $X -C $W pb; tar czf $OUT/ftc.tgz $X -C $W ftc
tar czf $OUT/pd.tgz $X -C $W pd; tar czf $OUT/logs.tgz -C $W logs parts
ls -la $OUT; el done
