from pacs.cli import main

main()
