"""Airline domain (in-domain): Skyline Air, an invented airline with reservations, bags and flight changes.

The policy and the conversation scripts; the database and the tools are in airline_tools.py.
Policy rules the scripts follow and the tools enforce: verify customer id + last name first,
cancellation only for business or insured reservations, no flight changes on basic fares, bags
$35 each (free for gold) up to 4 per reservation, confirm before any write.
"""

from __future__ import annotations

from data.synthetic.airline_steps import AirlineSteps, people
from data.synthetic.airline_tools import BAG_FEE, CABINS, INSURANCE_FEE, MAX_BAGS, TOOLS, make_db, random_date
from data.synthetic.world import Dialogue, Domain, confirm_write, converse, listing, money, sentences

POLICY = (
    "You are the support agent of Skyline Air. Verify the customer by customer id and last name "
    "before any reservation action. Ask for missing details; if the customer names a destination "
    "instead of a reservation id, find it among their reservations. Only business or insured "
    "reservations can be cancelled. Basic fares cannot change flights. Extra bags cost $35 each, "
    "free for gold members, at most 4 per reservation. Before a booking or change, state the details "
    "and cost and wait for an explicit yes. Flight status needs no verification."
)


class AirlineChat(AirlineSteps):
    """Scripts one airline conversation about the database's single customer, one method per intent."""

    def book(self, dlg: Dialogue, first: bool) -> None:
        flights = dlg.db["flights"].values()
        booked = {(r["origin"], r["destination"]) for r in dlg.db["reservations"].values()}
        routes = sorted({(f["origin"], f["destination"]) for f in flights} - booked) or sorted(booked)
        origin, destination = self.rng.choice(routes)
        date = random_date(self.rng)
        passengers = self.rng.randint(1, 3)
        cabin = self.rng.choices(CABINS, (2, 5, 2))[0]
        insurance = self.rng.random() < 0.3
        say_cabin = self.rng.random() < 0.7
        preference, wish = self.preference()
        parts = [dlg.pick(("I need a flight from {o} to {d} on {date}.", "Can you book {o} to {d} for {date}?",
                           "I want to fly {o}-{d} on {date}."), o=origin, d=destination, date=date),
                 dlg.pick(("We are {n}.", "It's for {n}.", "{n} in total.") if passengers > 1 else
                          ("Just me.", "It's for 1 passenger.", "Only 1 passenger."), n=people(passengers))]
        if say_cabin:
            parts.append(dlg.pick(("{cabin} class please.", "In {cabin}."), cabin=cabin).capitalize())
        if insurance:
            parts.append(self.rng.choice(("Add travel insurance.", "With insurance, please.")))
        if preference:
            parts.append(wish)
        request = parts[0] + " " + sentences(dlg, parts[1:])
        self.open_request(first, request, "book a flight", None)
        if not say_cabin:
            dlg.say(dlg.pick(("Which cabin would you like: basic, economy or business?",
                              "Sure. Basic, economy or business cabin?")),
                    "The user wants to book but did not say the cabin, which search_flights and book_flight "
                    "need for the price. I ask for it.")
            dlg.user(dlg.pick(("{cabin}.", "{cabin}, please.", "Let's go with {cabin}."), cabin=cabin).capitalize())
        search = dlg.call("search_flights", {"origin": origin, "destination": destination, "date": date,
                                             "cabin": cabin},
                          f"The user wants {cabin} seats from {origin} to {destination} on {date} for "
                          f"{people(passengers)}. I call search_flights.")
        options = self.flight_options(search, None, passengers)
        if not options:
            dlg.say(dlg.pick(("Sorry, no flight from {o} to {d} on {date} has {n} seats left.",
                              "There are not enough seats for {n} on any {o}-{d} flight that day."),
                             o=origin, d=destination, date=date, n=passengers),
                    f"search_flights shows no flight with at least {passengers} seats, so I cannot book. I tell "
                    "the user.")
            return
        chosen, choice = self.choose_flight(
            options, preference, f"search_flights returned {len(options)} flight(s) with enough seats. The user "
                                 "must choose one before I can book, so I list them.")
        seat_price = chosen["price"]
        extra = INSURANCE_FEE * passengers if insurance else 0
        total = seat_price * passengers + extra
        arithmetic = f"{passengers} x {money(seat_price)}" + (f" + {passengers} x {money(INSURANCE_FEE)} insurance"
                                                              if insurance else "") + f" = {money(total)}"
        arguments = {"customer_id": dlg.authenticated, "flight_id": chosen["flight_id"], "date": date, "cabin": cabin,
                     "passengers": passengers}
        if insurance:
            arguments["insurance"] = True
        confirm_write(dlg, 
            dlg.pick(("To confirm: {fid} on {date}, {cabin}, {n}{ins}. Total {total}. Shall I book it?",
                      "Booking {fid} ({o}-{d}, {date}) in {cabin} for {n}{ins} costs {total}. Go ahead?"),
                     fid=chosen["flight_id"], date=date, cabin=cabin, n=people(passengers), o=origin, d=destination,
                     ins=" with insurance" if insurance else "", total=money(total)),
            f"{choice} Cost: {arithmetic}. I need an explicit yes before "
            "book_flight, so I state the details and ask.",
            ("book_flight", arguments),
            f"The user confirmed. I call book_flight for {dlg.authenticated} on {chosen['flight_id']}, {date}, "
            f"{cabin}, {people(passengers)}" + (", with insurance." if insurance else "."),
            lambda result: (dlg.pick(("Booked! Your reservation is {rid}, total {total}.",
                                      "Done: reservation {rid} is confirmed. You paid {total}."),
                                     rid=result["reservation_id"], total=money(result["total"])),
                            f"book_flight created reservation {result['reservation_id']} for "
                            f"{money(result['total'])}. I give the user the id and total."),
            dlg.pick(("Okay, I haven't booked anything.", "No problem, nothing was booked.")))

    def cancel(self, dlg: Dialogue, first: bool) -> None:
        reservation = self.pick_reservation(lambda r: r["insurance"] or r["cabin"] == "business", bias=0.8)
        rid = reservation["reservation_id"]
        why = self.rng.choice(("my plans changed", "I'm sick", "I just can't go"))
        current = self.find_reservation(
            first, reservation, "cancel a reservation", "check whether it can be cancelled",
            ("Please cancel reservation {rid}, {why}.", "I need to cancel {rid} because {why}."),
            ("Please cancel my trip to {dest}; {why}.", "I can't make my flight to {dest}, {why}. Cancel it please."),
            ("I need to cancel a trip, {why}.", "Please cancel my booking; {why}."), why=why)
        rid = current["reservation_id"]
        if current["status"] != "booked":
            dlg.say(dlg.pick(("Reservation {rid} is already {status}.", "{rid} was already {status}; nothing to do."),
                             rid=rid, status=current["status"]),
                    f"get_reservation shows {rid} is {current['status']}, so there is nothing to cancel.")
            return
        if not (current["insurance"] or current["cabin"] == "business"):
            dlg.say(dlg.pick(("Sorry, reservation {rid} is {cabin} without insurance, so it can't be cancelled.",
                              "I can't cancel {rid}: only business or insured bookings can be cancelled, and it is "
                              "{cabin} without insurance."), rid=rid, cabin=current["cabin"]),
                    f"get_reservation shows {rid} is {current['cabin']} without insurance. The policy allows "
                    "cancelling only business or insured reservations, so I refuse and do not call "
                    "cancel_reservation.")
            return
        basis = "business" if current["cabin"] == "business" else "insured"
        confirm_write(dlg, 
            dlg.pick(("Reservation {rid} ({o}-{d}, {date}) is {basis}, so I can cancel it and refund {paid}. "
                      "Confirm?", "I can cancel {rid} and refund {paid}. Shall I proceed?"),
                     rid=rid, o=current["origin"], d=current["destination"], date=current["date"], basis=basis,
                     paid=money(current["paid"])),
            f"Reservation {rid} is {basis}, so cancellation is allowed, with a refund of the {money(current['paid'])} "
            "paid. I need an explicit yes before cancel_reservation.",
            ("cancel_reservation", {"reservation_id": rid}),
            f"The user confirmed, so I call cancel_reservation for {rid}.",
            lambda result: (dlg.pick(("Reservation {rid} is cancelled; {refund} will be refunded.",
                                      "Done. {rid} is cancelled and you'll get {refund} back."),
                                     rid=rid, refund=money(result["refund"])),
                            f"cancel_reservation succeeded with a refund of {money(result['refund'])}. I tell the user."),
            dlg.pick(("Okay, reservation {rid} stays booked.", "Alright, I left {rid} as it is."), rid=rid))

    def change(self, dlg: Dialogue, first: bool) -> None:
        reservation = self.pick_reservation(lambda r: r["cabin"] != "basic" and r["status"] == "booked")
        rid = reservation["reservation_id"]
        request = self.reservation_phrase(
            rid, ("Can I switch reservation {rid} to another flight that day?",
                  "I'd like a different flight time for {rid}."),
            ("I want to move my flight to a different time.", "Can I change to another flight on the same day?"))
        preference, wish = self.preference()
        if preference:
            request += " " + wish
        self.open_request(first, request, "change flights", rid)
        current = self.look_up(rid, "check its fare and route")
        if current["status"] != "booked" or current["cabin"] == "basic":
            why = "it is a basic fare" if current["status"] == "booked" else f"it is {current['status']}"
            dlg.say(dlg.pick(("Sorry, I can't change reservation {rid} because {why}.",
                              "Reservation {rid} can't be moved: {why}."), rid=rid, why=why),
                    f"get_reservation shows {rid}: {why}. The policy forbids the change, so I refuse without "
                    "calling change_flight.")
            return
        search = dlg.call("search_flights", {"origin": current["origin"], "destination": current["destination"],
                                             "date": current["date"], "cabin": current["cabin"]},
                          f"Reservation {rid} is {current['cabin']}, so it can change. I call search_flights for "
                          f"{current['origin']}-{current['destination']} on {current['date']} to find other flights.")
        options = self.flight_options(search, current["flight_id"], current["passengers"])
        if not options:
            dlg.say(dlg.pick(("Sorry, there is no other flight with {n} free seats that day.",
                              "No other {o}-{d} flight that day has room for {n}."),
                             n=current["passengers"], o=current["origin"], d=current["destination"]),
                    "search_flights shows no other flight with enough seats, so the change is impossible.")
            return
        chosen, choice = self.choose_flight(
            options, preference, f"search_flights found {len(options)} other flight(s) with enough seats. I list "
                                 "them so the user can choose.")
        old_price = next(flight["price"] for flight in search["flights"] if flight["flight_id"] == current["flight_id"])
        difference = (chosen["price"] - old_price) * current["passengers"]
        arithmetic = (f"({money(chosen['price'])} - {money(old_price)}) x {current['passengers']} = "
                      f"{'-' if difference < 0 else ''}{money(abs(difference))}")
        cost = (f"a fare difference of {money(difference)}" if difference > 0 else
                f"a credit of {money(-difference)}" if difference < 0 else "no fare difference")
        confirm_write(dlg, 
            dlg.pick(("Moving {rid} to {fid} at {time} means {cost}. Shall I make the change?",
                      "I'll move {rid} to {fid} ({time}), with {cost}. Confirm?"),
                     rid=rid, fid=chosen["flight_id"], time=chosen["depart"], cost=cost),
            f"{choice} Fare difference: {arithmetic}. I need an explicit yes before "
            "change_flight.",
            ("change_flight", {"reservation_id": rid, "flight_id": chosen["flight_id"]}),
            f"The user confirmed. I call change_flight to move {rid} to {chosen['flight_id']}.",
            lambda result: (dlg.pick(("Done: {rid} is now on {fid}.", "Your reservation {rid} is moved to {fid}."),
                                     rid=rid, fid=result["flight_id"]),
                            f"change_flight moved {rid} to {result['flight_id']}. I confirm it."),
            dlg.pick(("Okay, {rid} stays on your current flight.", "No change made to {rid}."), rid=rid))

    def bags(self, dlg: Dialogue, first: bool) -> None:
        reservation = self.pick_reservation(lambda r: r["status"] == "booked" and r["bags"] < MAX_BAGS, bias=0.8)
        rid = reservation["reservation_id"]
        count = self.rng.randint(1, 3)
        current = self.find_reservation(
            first, reservation, "add bags", "check its bags",
            ("Please add {n} checked bag{s} to reservation {rid}.", "I need {n} more bag{s} on {rid}."),
            ("Add {n} bag{s} to my flight to {dest}, please.", "I need {n} checked bag{s} for my trip to {dest}."),
            ("I'd like to add {n} checked bag{s} to my trip.", "Can I add {n} bag{s} to my booking?"),
            n=count, s="s" if count > 1 else "")
        rid = current["reservation_id"]
        if current["status"] != "booked" or current["bags"] + count > MAX_BAGS:
            why = (f"it already has {current['bags']} bags and the limit is {MAX_BAGS}"
                   if current["status"] == "booked" else f"it is {current['status']}")
            dlg.say(dlg.pick(("Sorry, I can't add {n} bags to {rid}: {why}.", "That isn't possible for {rid}, as {why}."),
                             n=count, rid=rid, why=why),
                    f"get_reservation shows {rid}: {why}. Adding {count} would break the policy, so I refuse "
                    "without calling add_bags.")
            return
        tier = self.tier or "regular"
        fee = 0 if tier == "gold" else BAG_FEE * count
        arithmetic = "$0.00, free for gold members" if tier == "gold" else f"{count} x {money(BAG_FEE)} = {money(fee)}"
        confirm_write(dlg, 
            dlg.pick(("Adding {n} bag{s} to {rid} costs {fee}{gold}. Shall I go ahead?",
                      "{rid} will have {total} bags; the fee is {fee}{gold}. Confirm?"),
                     n=count, s="s" if count > 1 else "", rid=rid, fee=money(fee), total=current["bags"] + count,
                     gold=" as a gold member" if tier == "gold" else ""),
            f"{rid} has {current['bags']} bags; adding {count} makes {current['bags'] + count}, within {MAX_BAGS}. "
            f"The customer is {tier}, so the fee is {arithmetic}. I ask for a yes before add_bags.",
            ("add_bags", {"reservation_id": rid, "bags": count}),
            f"The user confirmed. I call add_bags to add {count} bag(s) to {rid}.",
            lambda result: (dlg.pick(("Done: {rid} now has {bags} bags, fee {fee}.",
                                      "Added. {rid} has {bags} checked bags; you were charged {fee}."),
                                     rid=rid, bags=result["bags"], fee=money(result["fee"])),
                            f"add_bags succeeded: {result['bags']} bags, fee {money(result['fee'])}. I report it."),
            dlg.pick(("Okay, no bags were added.", "Alright, {rid} keeps its current bags."), rid=rid))

    def details(self, dlg: Dialogue, first: bool) -> None:
        reservation = self.pick_reservation(lambda r: True)
        rid = reservation["reservation_id"]
        current = self.find_reservation(
            first, reservation, "know their booking details", "read its details",
            ("What are the details of reservation {rid}?", "When is my flight on {rid}?",
             "Can you remind me what's booked on {rid}?"),
            ("What are the details of my trip to {dest}?", "When do I fly to {dest}?"),
            ("Can you check my booking?", "When does my flight leave?"))
        rid = current["reservation_id"]
        dlg.say(dlg.pick(("Reservation {rid} is {status}: {fid} from {o} to {d} on {date}, {cabin}, {n}, {bags} bags.",
                          "{rid}: flight {fid} {o}-{d} on {date} in {cabin} for {n} ({status})."),
                         rid=rid, status=current["status"], fid=current["flight_id"], o=current["origin"],
                         d=current["destination"], date=current["date"], cabin=current["cabin"],
                         n=people(current["passengers"]), bags=current["bags"]),
                f"get_reservation returned {rid}: {current['flight_id']} {current['origin']}-{current['destination']} "
                f"on {current['date']}, {current['cabin']}. The user only asked, so I answer.")

    def trip_status(self, dlg: Dialogue, first: bool) -> None:
        """Two reads in a row: the reservation, then its flight's status on the reservation's date."""
        reservation = self.pick_reservation(lambda r: r["status"] == "booked")
        current = self.find_reservation(
            first, reservation, "know if their flight is on time", "find its flight and date",
            ("Is my flight on reservation {rid} on time?", "Any delays for booking {rid}?"),
            ("Is my flight to {dest} on time?", "Is my {dest} flight delayed?"),
            ("Is my flight on time?", "Will my flight leave on time?"))
        flight_id, date = current["flight_id"], current["date"]
        result = dlg.call("flight_status", {"flight_id": flight_id, "date": date},
                          f"get_reservation shows flight {flight_id} on {date}. I call flight_status for that "
                          "flight and date.")
        fact = {"on time": "is on time", "cancelled": "is cancelled",
                "delayed": f"is delayed by {result['delay_min']} minutes"}[result["status"]]
        dlg.say(dlg.pick(("Your flight {fid} on {date} {fact}.", "Flight {fid} ({date}) {fact}."),
                         fid=flight_id, date=date, fact=fact),
                f"flight_status says {flight_id} {fact}. I answer with that.")

    def list_trips(self, dlg: Dialogue, first: bool) -> None:
        request = dlg.pick(("Which reservations do I have?", "Can you list my bookings?", "What trips do I have booked?"))
        self.open_request(first, request, "see their reservations", None)
        result = dlg.call("get_customer", {"customer_id": dlg.authenticated},
                          f"The customer is verified as {dlg.authenticated} and wants their reservations, so I "
                          "call get_customer.")
        ids = result["reservations"]
        dlg.say(dlg.pick(("You have {count} reservation{s}: {ids}.", "I see {ids} on your account."),
                         count=len(ids), s="s" if len(ids) > 1 else "", ids=listing(ids)),
                f"get_customer lists {len(ids)} reservation(s): {listing(ids)}. I answer with them.")

    def latest(self, dlg: Dialogue, first: bool) -> None:
        """Two reads in a row: the reservation list, then the newest one (the last id in the list)."""
        request = dlg.pick(("What's on my latest booking?", "Can you check my most recent reservation?",
                            "What did I book last?"))
        self.open_request(first, request, "check their latest booking", None)
        result = dlg.call("get_customer", {"customer_id": dlg.authenticated},
                          f"The customer is verified as {dlg.authenticated} but gave no reservation id. "
                          "get_customer lists their reservations, so I call it.")
        newest = result["reservations"][-1]
        current = dlg.call("get_reservation", {"reservation_id": newest},
                           f"get_customer lists {listing(result['reservations'])}; the latest is the last one, "
                           f"{newest}. I call get_reservation for its details.")
        dlg.say(dlg.pick(("Your latest reservation {rid} is {fid} from {o} to {d} on {date} ({status}).",
                          "{rid}: {o}-{d} on {date}, {cabin}, {status}."),
                         rid=newest, fid=current["flight_id"], o=current["origin"], d=current["destination"],
                         date=current["date"], cabin=current["cabin"], status=current["status"]),
                f"get_reservation shows {newest}: {current['origin']}-{current['destination']} on "
                f"{current['date']}, {current['status']}. I answer.")

    def status(self, dlg: Dialogue, first: bool) -> None:
        flight = self.rng.choice(sorted(dlg.db["flights"].values(), key=lambda flight: flight["flight_id"]))
        date = random_date(self.rng)
        dlg.user(dlg.pick(("Is flight {fid} on time on {date}?", "What's the status of {fid} on {date}?",
                           "Any delay for {fid} on {date}?"), fid=flight["flight_id"], date=date))
        result = dlg.call("flight_status", {"flight_id": flight["flight_id"], "date": date},
                          f"The user asks about flight {flight['flight_id']} on {date}. Flight status needs no "
                          "verification, so I call flight_status.")
        fact = {"on time": "is on time", "cancelled": "is cancelled",
                "delayed": f"is delayed by {result['delay_min']} minutes"}[result["status"]]
        dlg.say(dlg.pick(("Flight {fid} on {date} {fact}.", "On {date}, {fid} {fact}."),
                         fid=flight["flight_id"], date=date, fact=fact),
                f"flight_status says {flight['flight_id']} {fact}. I answer with that.")

    def refuse(self, dlg: Dialogue, first: bool) -> None:
        request, reason = self.rng.choice((
            ("Can you upgrade me to business for free?", "I can't give free upgrades"),
            ("Can I transfer my ticket to a friend?", "tickets can't be transferred"),
            ("Could you waive the bag fee this time?", "I can't waive bag fees"),
            ("Can you give me a voucher for my trouble?", "I can't issue vouchers")))
        dlg.user(request)
        dlg.say(dlg.pick(("Sorry, {reason}; the policy doesn't allow it.", "I'm afraid {reason}. Anything else?"),
                         reason=reason),
                f"The user asks for something the policy does not allow ({reason}). No tool can do it, so I "
                "refuse politely.")


def script(dlg: Dialogue) -> None:
    chat = AirlineChat(dlg)
    openers = [(chat.book, 2), (chat.cancel, 2.5), (chat.change, 2), (chat.bags, 2), (chat.details, 1.5),
               (chat.list_trips, 1), (chat.latest, 1.5), (chat.trip_status, 1.5), (chat.status, 1)]
    followups = openers + [(chat.refuse, 0.7)]
    converse(dlg, openers, followups)


AIRLINE = Domain("airline", POLICY, TOOLS, make_db, script)
