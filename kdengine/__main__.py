from kdengine.cli import main

main()
