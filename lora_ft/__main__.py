from lora_ft.cli import app

app()
