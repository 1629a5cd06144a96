"""The built-in offline demo: a deterministic synthetic landmark photo set, and the HTTP server for it.

    python -m landmarks.demo generate --out data/demo --settings '<config.yaml demo section as JSON>'
    python -m landmarks.demo serve --root data/demo --port 8765

Modules, from the pixels up (nothing is imported here, so `landmarks.demo.server` loads alone):

    canvas        seeded random streams, colours, value noise, textures, the RGBA drawing Layer
    scenes        landmark specs, palettes, the twelve structure drawers, sky/ground/props: render_landmark
    camera        a view of a scene: perspective, relighting, occluders, camera noise: photograph
    nonlandmarks  everyday non-landmark scenes: render_nonlandmark
    files         encodings (JPEG, PNG, RGBA, grey, CMYK, EXIF-rotated), writing photos and CSV tables
    generate      the photo plan, the worker tasks, generate() (the set, urls.csv, faults.csv, demo.json)
    server        the fault-injecting HTTP server, DemoServer (a thread), start/stop_server_process
    __main__      the command line
"""
