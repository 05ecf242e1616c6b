from dataplane.gateway.server import main

main()
