"""Where does one of our GPU steps spend host time? cProfile over a short run (diagnostics)."""
import cProfile, pstats, sys
sys.path.insert(0, "benchmarks")
import bench_trainer as b
b.quiet_libraries()
cProfile.run("print(b.our_case('cuda', False, 1, 6, 2, None))", "/tmp/p.out")
pstats.Stats("/tmp/p.out").sort_stats("tottime").print_stats(25)
