cd /work/main
OMP_NUM_THREADS=1 .venv/bin/aiayn train configs/pretrain_causal.yaml --run_dir /tmp/ts/run \
  --data.root ../shared/data --data.sources "[{path: tiny_shakespeare/input.txt, split: paragraph}]" \
  --data.vocab_size 4000 --data.block_size 128 \
  --model.d_model 128 --model.d_ff 512 --model.n_heads 4 --model.n_decoder_layers 4 --model.max_len 256 --model.dropout 0.2 \
  --train.max_tokens 4096 --train.max_steps 2000 --train.warmup_steps 200 --train.lr_scale 0.2 \
  --train.eval_every 250 --train.save_every 250 --train.log_every 50 --quiet
cd /work/main; .venv/bin/aiayn generate --checkpoint /tmp/ts/run --prompt "ROMEO:" --prompt "KING RICHARD III:" --prompt "" --max-new-tokens 60 --top-p 0.9 --temperature 0.8 --seed 0 > samples.txt
