"""The server's commands, `caffeserve serve|check|fetch` (and `python -m inference_server ...`):
each module has `main(argv)`. `s3` is fetch's S3 client."""
