cd /work/main
.venv/bin/diffmic fit --config cpu model.encoder=efficientnet_lite0 model.dcg_global=efficientnet_lite0 model.dcg_local=efficientnet_lite0 model.pretrained=true model.freeze_stride=8 data.image_size=128 model.crop_size=16 model.dcg_output_stride=16 model.roi_select=top_class data.batch_size=32 train.dcg_warmup_steps=400 train.joint_steps=200 run.dir=/tmp/exp/r1
.venv/bin/diffmic test --run /tmp/exp/r1
