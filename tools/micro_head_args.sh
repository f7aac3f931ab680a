# The micro heads' training settings (sourced by tools/train_micro_world.sh and tools/micro_tables.sh,
# so that the ablation head of the tables is trained exactly like the embedded heads).
micro_head_args=(--data world:train:4000 --steps 2000 --batch-size 8 --save-every 250 --fast-cross-attention)
# ZNet and LD-ZNet add a per-sample Dice loss to the BCE; RGBNet keeps the BCE alone (README, "The micro world")
micro_latent_head_args=(--dice-weight 1)
