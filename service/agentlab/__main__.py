from agentlab.server import main

main()
