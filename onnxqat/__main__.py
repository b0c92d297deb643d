from onnxqat.cli import main

main()
