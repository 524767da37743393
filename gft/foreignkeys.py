"""What TRL's and mlx-lm's configs call the things gft names otherwise (gft/config.py
points an unknown key found here at gft's equivalent)."""
from __future__ import annotations

# Keys of TRL's GRPOConfig / SFTConfig (TrainingArguments) and of mlx-lm's (and
# mlx-lm-lora's) LoRA config that gft spells differently or does not have. An unknown key
# found here is an error that points at gft's equivalent (the README's "Coming from TRL
# or mlx-lm" table says the same). Names gft shares with them (learning_rate, max_steps,
# seed, temperature, top_p, weight_decay, warmup_steps, max_grad_norm, output_dir, model,
# data, save_every, ...) need no entry. Keys that name a gft field are never looked up
# here: TRL's report_to, logging_steps and run_name are gft keys too.
FOREIGN_KEYS: dict[str, str] = {
    # TRL GRPOConfig
    "num_generations": "TRL's num_generations (completions per prompt) is gft's num_rollouts; "
                       "a gft group also holds num_offpolicy dataset responses",
    "max_completion_length": "TRL's max_completion_length is gft's max_response_tokens",
    "max_prompt_length": "TRL's max_prompt_length is gft's max_prompt_tokens "
                         "(prompt_overflow says what happens to a longer one)",
    "gradient_accumulation_steps": "gft sets updates in prompts, not accumulation steps: "
                                   "prompts_per_minibatch prompts per optimizer update, "
                                   "micro_batch_size sequences per forward/backward",
    "per_device_train_batch_size": "gft's micro_batch_size (sequences per forward/backward); "
                                   "prompts per update are prompts_per_minibatch",
    "per_device_eval_batch_size": "gft's rollout_batch_size (sequences decoded together)",
    "generation_batch_size": "gft's prompts_per_step (prompts rolled out per step) and "
                             "rollout_batch_size (sequences decoded together)",
    "steps_per_generation": "gft's prompts_per_step / prompts_per_minibatch (updates per step)",
    "num_iterations": "gft makes exactly one update per batch of rollouts (TRL's default, 1)",
    "beta": "gft has no KL penalty (TRL's default beta is 0.0); remove the key",
    "epsilon": "gft has no PPO ratio clipping: with one update per rollout batch the "
               "ratio is 1; the closest knob is tau, the DCR threshold on off-policy tokens",
    "epsilon_high": "gft has no PPO ratio clipping (see epsilon)",
    "loss_type": "gft's loss_aggregation: token-mean (TRL 'dapo'), seq-mean-token-mean "
                 "(TRL 'grpo'), seq-mean-token-sum (close to TRL 'dr_grpo')",
    "scale_rewards": "gft's advantage: grpo (scale by the group's std), dr_grpo (no scaling)",
    "reward_funcs": "gft's rewards (file.py:function takes TRL reward functions unchanged)",
    "reward_weights": "gft's rewards: [{name: ..., weight: ...}]",
    "use_vllm": "gft samples with the training backend (rollout_engine: policy | bfloat16)",
    "mask_truncated_completions": "gft always trains on truncated rollouts (their "
                                  "truncation is logged as truncated/rollout)",
    # TRL SFTConfig and transformers' TrainingArguments
    "num_train_epochs": "TRL's num_train_epochs is gft's epochs",
    "max_length": "gft caps prompt and response apart: max_prompt_tokens, max_response_tokens",
    "max_seq_length": "gft caps prompt and response apart: max_prompt_tokens, "
                      "max_response_tokens",
    "completion_only_loss": "gft always trains on the responses only (prompt tokens masked)",
    "assistant_only_loss": "gft always trains on the responses only (prompt tokens masked)",
    "dataset_text_field": "gft reads prompt / completion / messages columns (a 'text'-only "
                          "row has no prompt); see the README's Data format",
    "packing": "gft does not pack sequences",
    "lr_scheduler_type": "TRL's lr_scheduler_type is gft's lr_schedule (constant | linear | "
                         "cosine)",
    "warmup_ratio": "gft's warmup_steps (a number of optimizer updates)",
    "adam_epsilon": "TRL's adam_epsilon is gft's adam_eps",
    "save_steps": "TRL's save_steps is gft's save_every",
    "save_total_limit": "TRL's save_total_limit is gft's keep_checkpoints",
    "eval_steps": "TRL's eval_steps is gft's eval_every",
    "eval_strategy": "gft evaluates every eval_every steps (0 = at the start and end)",
    "eval_dataset": "gft's eval_data (a file, a directory or a split name)",
    "bf16": "gft's dtype: bfloat16 (bf16 weights) or mixed_precision: true (bf16 compute, "
            "float32 weights)",
    "model_init_kwargs": "gft's dtype and trust_remote_code",
    "peft_config": "gft's lora_rank, lora_alpha, lora_dropout, lora_targets",
    "resume_from_checkpoint": "gft train --resume RUN_DIR",
    "logging_dir": "gft writes TensorBoard event files to <run>/tensorboard with "
                   "report_to: [tensorboard] (every step is also in <run>/metrics.jsonl)",
    "logging_strategy": "gft logs every step to metrics.jsonl and report_to's trackers; "
                        "gft's logging_steps spaces the plain lines of a non-terminal log",
    "logging_first_step": "gft always logs step 1 (and every step to metrics.jsonl)",
    "log_level": "gft prints notes, warnings and errors; every step's metrics are in "
                 "metrics.jsonl",
    "log_completions": "gft logs a sample completion every sample_every steps "
                       "(samples.jsonl and the trackers' samples table)",
    "num_completions_to_print": "gft logs a sample completion every sample_every steps",
    "save_strategy": "gft saves every save_every steps (0 = only at the end)",
    "overwrite_output_dir": "gft never overwrites a run: continue one with --resume, or "
                            "pick another output_dir",
    "do_train": "gft train trains; gft eval evaluates",
    "do_eval": "gft evaluates when it has held-out rows (eval_samples: 0 turns it off)",
    "gradient_checkpointing_kwargs": "gft's gradient_checkpointing: true (transformers' "
                                     "defaults)",
    "push_to_hub": "gft does not upload; after the run: hf upload ORG/NAME RUN_DIR/final",
    "hub_model_id": "gft does not upload; after the run: hf upload ORG/NAME RUN_DIR/final",
    "hub_strategy": "gft does not upload; after the run: hf upload ORG/NAME RUN_DIR/final",
    "hub_private_repo": "gft does not upload; hf upload ... --private",
    "deepspeed": "gft runs data-parallel with --nproc N (torchrun) and parallel: ddp | fsdp",
    "fsdp": "gft's parallel: fsdp (FSDP2), with --nproc N or torchrun",
    "fsdp_config": "gft's parallel: fsdp (FSDP2), with --nproc N or torchrun",
    "dataloader_num_workers": "gft reads and tokenizes the data once, before training",
    "remove_unused_columns": "gft passes every data column to reward functions",
    "vllm_mode": "gft samples with the training backend (rollout_engine: policy | bfloat16)",
    "vllm_gpu_memory_utilization": "gft samples with the training backend (no vLLM)",
    "attn_implementation": "gft keeps the model's attention implementation (sdpa by "
                           "default) and packs sequences where it supports that",
    "model_revision": "gft loads a folder or a hub id's default revision; for another: "
                      "hf download ORG/NAME --revision REV --local-dir DIR, then model: DIR",
    # TRL's example scripts (ModelConfig, ScriptArguments) put these in the same YAML
    "model_name_or_path": "TRL's model_name_or_path is gft's model (a local directory or "
                          "hub id)",
    "torch_dtype": "gft's dtype (float32 | bfloat16)",
    "dataset_name": "gft's data: a Hugging Face Hub id (org/name, loaded with "
                    "datasets.load_dataset) or a local file or directory (JSONL, Parquet, "
                    "CSV, JSON or a datasets.save_to_disk copy)",
    "dataset_config": "gft's data with the configuration after a colon: org/name:config",
    "dataset_prompt_column": "Open-R1's dataset_prompt_column is gft's prompt_column",
    "prompt_feature": "mlx-lm's prompt_feature is gft's prompt_column",
    "completion_feature": "mlx-lm's completion_feature is gft's completion_column",
    "chat_feature": "gft reads a chat whose last turn is the demonstration from 'messages' "
                    "(rename the column), or a chat prompt from prompt_column",
    "text_feature": "a 'text'-only row has no prompt; gft needs prompt_column and "
                    "completion_column, or 'messages'",
    "dataset_train_split": "gft trains on the 'train' split of a data directory or hub data "
                           "set (or the whole of a data file)",
    "dataset_test_split": "gft's eval_split (a split of the data directory or hub data set) "
                          "or eval_data",
    "use_peft": "gft's lora_rank (> 0 trains LoRA adapters)",
    "lora_r": "TRL's lora_r is gft's lora_rank",
    "lora_target_modules": "TRL's lora_target_modules is gft's lora_targets",
    "top_k": "rollouts sample with temperature and top_p only (gft's top_p)",
    "min_p": "rollouts sample with temperature and top_p only (gft's top_p)",
    "repetition_penalty": "rollouts sample with temperature and top_p only (gft's top_p)",
    # mlx-lm lora config (and mlx-lm-lora's GRPO keys)
    "iters": "mlx-lm's iters is gft's max_steps",
    "batch_size": "gft counts prompts_per_step per step, prompts_per_minibatch per update "
                  "and micro_batch_size sequences per forward/backward",
    "adapter_path": "gft writes the adapter into output_dir (final/ and checkpoints/) when "
                    "lora_rank > 0",
    "resume_adapter_file": "gft train --resume RUN_DIR",
    "fine_tune_type": "gft's lora_rank: 0 = full fine-tune, > 0 = LoRA (no DoRA)",
    "num_layers": "gft adapts the layers named in lora_targets, in every block",
    "lora_parameters": "gft's lora_rank, lora_alpha (= mlx-lm's scale x rank), "
                       "lora_dropout and lora_targets (mlx-lm's keys)",
    "steps_per_report": "mlx-lm's steps_per_report is gft's logging_steps (every step is "
                        "also in the run's metrics.jsonl)",
    "steps_per_eval": "mlx-lm's steps_per_eval is gft's eval_every",
    "val_batches": "gft's eval_samples (held-out prompts per evaluation; 0 = none)",
    "test_batches": "gft's eval_samples, with eval_split: test",
    "test": "gft evaluates during training; gft eval MODEL scores a checkpoint",
    "train": "gft train is the command; there is no train switch",
    "grad_checkpoint": "mlx-lm's grad_checkpoint is gft's gradient_checkpointing",
    "grad_accumulation_steps": "gft's prompts_per_minibatch (per update) and "
                               "micro_batch_size (per forward/backward)",
    "mask_prompt": "gft always masks the prompt",
    "optimizer": "gft uses AdamW (adam_beta1, adam_beta2, adam_eps, weight_decay)",
    "optimizer_config": "gft uses AdamW (adam_beta1, adam_beta2, adam_eps, weight_decay)",
    "wandb": "gft's report_to: [wandb] (the project comes from WANDB_PROJECT)",
    "group_size": "mlx-lm-lora's group_size is gft's num_rollouts",
    "reward_functions": "gft's rewards",
    "train_mode": "gft's preset: sft | dft | grpo | gft",
}
