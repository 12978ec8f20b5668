"""Fine-tuning InstructPix2Pix on datagen exports."""
