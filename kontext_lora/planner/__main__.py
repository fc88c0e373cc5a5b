from kontext_lora.planner.calibrate import main

raise SystemExit(main())
