from pacs.cli import main

main(prog_name="minipacs")
