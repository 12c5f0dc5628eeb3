"""Ray orchestration of fit and score (see DESIGN.md's data flow).

Modules: runtime (Ray start-up, the streaming plan, progress), fit, score, layout (output files and
resume), cpu_stages (decode and outputs: CPU tasks, no torch) and stages (the model actors). This
package file imports none of them: a CPU worker that unpickles a cpu_stages function must not pay
for torch.
"""
